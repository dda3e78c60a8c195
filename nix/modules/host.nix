# Host-side conveniences and state per workspace: /etc/hosts names, shell
# aliases, pinned host keys for the host's ssh, and the setup unit that
# prepares the state directories before the workspace's unit starts.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.sandboxed-workspace;
  wlib = import ./lib.nix { inherit lib; };
  esc = lib.escapeShellArg;
  workspaces = cfg.allWorkspaces;
  escalate = if config.security.doas.enable or false then "doas" else "sudo";
  # "ssh-ed25519 AAAA... comment" -> "ssh-ed25519 AAAA..."
  keyTypeAndBlob = key: lib.concatStringsSep " " (lib.take 2 (lib.splitString " " key));

  aliases =
    name: ws:
    let
      unit = wlib.unitFor name ws;
      prefix = "workspace_${name}";
    in
    {
      ${prefix} = "ssh ${cfg.user.name}@${wlib.hostNameFor name}";
      "${prefix}_start" = "${escalate} systemctl start ${unit}";
      "${prefix}_stop" = "${escalate} systemctl stop ${unit}";
      "${prefix}_restart" = "${escalate} systemctl restart ${unit}";
      "${prefix}_status" = "systemctl status ${unit}";
    };

  setupUnit =
    name: ws:
    let
      units = [
        "${wlib.unitFor name ws}.service"
      ]
      ++ lib.optional (ws.type == "vm") "microvm-virtiofsd@${wlib.machineFor name}.service";
      owner = wlib.ownerFor cfg ws;
      uid = toString owner.uid;
      gid = toString owner.gid;
    in
    {
      description = "Prepare the state directories and SSH host key of workspace ${name}";
      # virtiofsd serves the directories to a VM: they must be right before it starts.
      before = units;
      # The bridge (systemd-networkd) exists before any workspace attaches to it.
      after = [ "network.target" ];
      # The state directory's nosuid,nodev mount (fileSystems below) is in place first.
      unitConfig.RequiresMountsFor = [ cfg.stateDir ];
      path = [
        pkgs.openssh
        pkgs.coreutils
        pkgs.util-linux
      ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      # Owner and mode are set on every start, not only when this unit creates a directory:
      # microvm.nix's tmpfiles rules create every share source as microvm:kvm 0775 at boot.
      # The host key is made only when missing: the server may have made it already, and pins
      # that one.
      #
      # The layout is direct mode's (sandbox_mcp/provision.py): the state directory 0711 (owners
      # pass through to their own workspace, nobody lists whose workspaces are there), each
      # workspace's directory 0711, and its shares 0700 for its owner alone.
      #
      # This runs as root in directories the server's user may own (the state directory's
      # owner; the host keys are theirs): it never acts through a symbolic link. It works
      # inside the workspace's directory once it has checked where that is, never follows a
      # link with chown (-h), and what follows links (chmod, ssh-keygen, creating files) runs
      # as the owner of what it touches (setpriv), who can change nothing of anyone else's.
      script = ''
        set -eu
        [ -e ${esc cfg.stateDir} ] || install -d -m 0711 ${esc cfg.stateDir}
        root=$(realpath -e -- ${esc cfg.stateDir})
        name=${esc name}
        refuse_link() {
          if [ -L "$1" ]; then
            echo "workspace ${name}: $1 is a symbolic link; remove it and start the workspace again" >&2
            exit 1
          fi
        }
        # The host keys belong to whoever owns the state directory (root, or the server's user).
        keys_owner=$(stat -c %u "$root")
        keys_group=$(stat -c %g "$root")
        as() { u=$1 g=$2; shift 2; setpriv --reuid="$u" --regid="$g" --clear-groups -- "$@"; }
        # dir NAME MODE UID GID, inside the current directory (made by the directory's owner).
        dir() {
          refuse_link "$1"
          [ -d "$1" ] || as "$(stat -c %u .)" "$(stat -c %g .)" mkdir -m 0700 -- "$1"
          refuse_link "$1"
          chown -h "$3:$4" -- "$1"
          as "$3" "$4" chmod "$2" -- "$1"
        }
        cd -- "$root"
        # Its owner narrows it (a home directory's subdirectory may have been made 0755).
        as "$keys_owner" "$keys_group" chmod 0711 .
        # 0711: the workspace's owner passes through to their workspace directory; nobody lists.
        dir "$name" 0711 "$keys_owner" "$keys_group"
        cd -P -- "$name"
        if [ "$(pwd -P)" != "$root/$name" ]; then
          echo "workspace ${name}: $root/$name moved while it was being prepared" >&2
          exit 1
        fi
        # The agent's (the workspace owner's) directories: nobody else on the host reads them.
        dir workspace 0700 ${uid} ${gid}
        dir claude-config 0700 ${uid} ${gid}
        dir ssh-host-keys 0700 "$keys_owner" "$keys_group"
        key=ssh-host-keys/ssh_host_ed25519_key
        for f in "$key" "$key.pub" ssh-host-keys/authorized_keys; do refuse_link "$f"; done
        if [ ! -e "$key" ]; then
          as "$keys_owner" "$keys_group" ssh-keygen -q -t ed25519 -N "" -C "$name" -f "$key"
        fi
        [ -e ssh-host-keys/authorized_keys ] || as "$keys_owner" "$keys_group" touch ssh-host-keys/authorized_keys
        for f in "$key" "$key.pub" ssh-host-keys/authorized_keys; do refuse_link "$f"; done
        as "$keys_owner" "$keys_group" chmod 0600 -- "$key"
        as "$keys_owner" "$keys_group" chmod 0644 -- "$key.pub" ssh-host-keys/authorized_keys
      ''
      + lib.optionalString (ws.hostKey != null) ''
        if [ "$(cut -d' ' -f1,2 "$key.pub")" != ${esc (keyTypeAndBlob ws.hostKey)} ]; then
          echo "workspace ${name}: $root/$name/$key.pub differs from sandboxed-workspace.workspaces.${name}.hostKey;" \
            "restore the pinned key or update hostKey (and the server's pin)" >&2
          exit 1
        fi
      ''
      + lib.optionalString (cfg.binaryCache.netrcFile != null) ''
        install -d -m 0700 -o 0 -g 0 /run/sandboxed-workspace
        cd /run/sandboxed-workspace
        dir "$name" 0700 0 0
        install -m 0400 -o 0 -g 0 ${esc cfg.binaryCache.netrcFile} "/run/sandboxed-workspace/$name/netrc"
      '';
    };
in
{
  config = lib.mkIf (cfg.enable && workspaces != { }) {
    networking.hosts = lib.mkMerge (
      lib.mapAttrsToList (name: ws: { ${ws.ip} = [ (wlib.hostNameFor name) ]; }) workspaces
    );

    environment.shellAliases = lib.mkMerge (lib.mapAttrsToList aliases workspaces);

    programs.ssh.knownHosts = lib.mapAttrs' (
      name: ws:
      lib.nameValuePair (wlib.hostNameFor name) {
        hostNames = [
          (wlib.hostNameFor name)
          ws.ip
        ];
        publicKey = ws.hostKey;
      }
    ) (lib.filterAttrs (_: ws: ws.hostKey != null) workspaces);

    systemd.services = lib.mapAttrs' (
      name: ws: lib.nameValuePair (wlib.setupUnitFor name) (setupUnit name ws)
    ) workspaces;

    # The shares are nosuid,nodev on the host side too: a setuid program or a device node
    # left in a workspace directory does nothing when run or opened on the host. Bind
    # mounts of it (nspawn's) inherit the flags; virtiofsd and Incus serve from it. Where
    # the administrator mounts a file system of their own there, it gets the two options.
    fileSystems.${cfg.stateDir} = {
      device = lib.mkDefault cfg.stateDir;
      fsType = lib.mkDefault "none";
      options = [
        "nosuid"
        "nodev"
      ]
      ++ lib.optional (config.fileSystems.${cfg.stateDir}.device == cfg.stateDir) "bind";
    };
  };
}
