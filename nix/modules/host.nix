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
      ++ lib.optional (ws.type == "vm") "microvm-virtiofsd@${name}.service";
      uid = toString cfg.user.uid;
    in
    {
      description = "Prepare the state directories and SSH host key of workspace ${name}";
      # virtiofsd serves the directories to a VM: they must be right before it starts.
      before = units;
      # The bridge (systemd-networkd) exists before any workspace attaches to it.
      after = [ "network.target" ];
      path = [
        pkgs.openssh
        pkgs.coreutils
      ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      # Owner and mode are set on every start, not only when this unit creates a directory:
      # microvm.nix's tmpfiles rules create every share source as microvm:kvm 0775 at boot,
      # which would leave ~/workspace unwritable for the agent and the pinned host key
      # writable by the kvm group. The host key is made only when missing: the server may
      # have made it already, and pins that one.
      script = ''
        set -eu
        root=${esc cfg.stateDir}
        state=${esc "${cfg.stateDir}/${name}"}
        install -d -m 0755 "$state"
        # The host key folder belongs to whoever owns the state directory (root, or the
        # server's user), so the server can still write authorized_keys there.
        keys_owner=$(stat -c %u:%g "$root")
        # dir PATH MODE OWNER:GROUP; never through a symbolic link, since this runs as root.
        dir() {
          if [ -L "$1" ]; then
            echo "workspace ${name}: $1 is a symbolic link; remove it and start the workspace again" >&2
            exit 1
          fi
          install -d -m "$2" -o "''${3%%:*}" -g "''${3##*:}" "$1"
        }
        # gid 100 is the "users" group inside the workspaces.
        dir "$state/workspace" 0755 ${uid}:100
        dir "$state/claude-config" 0700 ${uid}:100
        dir "$state/ssh-host-keys" 0755 "$keys_owner"
        key="$state/ssh-host-keys/ssh_host_ed25519_key"
        if [ ! -e "$key" ]; then
          ssh-keygen -q -t ed25519 -N "" -C ${esc name} -f "$key"
        fi
        [ -e "$state/ssh-host-keys/authorized_keys" ] \
          || install -m 0644 /dev/null "$state/ssh-host-keys/authorized_keys"
        for f in "$key" "$key.pub" "$state/ssh-host-keys/authorized_keys"; do
          if [ -L "$f" ]; then
            echo "workspace ${name}: $f is a symbolic link; remove it and start the workspace again" >&2
            exit 1
          fi
        done
        chown "$keys_owner" "$key" "$key.pub" "$state/ssh-host-keys/authorized_keys"
        chmod 0600 "$key"
        chmod 0644 "$key.pub" "$state/ssh-host-keys/authorized_keys"
      ''
      + lib.optionalString (ws.hostKey != null) ''
        if [ "$(cut -d' ' -f1,2 "$key.pub")" != ${esc (keyTypeAndBlob ws.hostKey)} ]; then
          echo "workspace ${name}: $key.pub differs from sandboxed-workspace.workspaces.${name}.hostKey;" \
            "restore the pinned key or update hostKey (and the server's pin)" >&2
          exit 1
        fi
      ''
      + lib.optionalString (cfg.binaryCache.netrcFile != null) ''
        dir /run/sandboxed-workspace/${name} 0700 0:0
        install -m 0400 -o 0 -g 0 ${esc cfg.binaryCache.netrcFile} /run/sandboxed-workspace/${name}/netrc
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
  };
}
