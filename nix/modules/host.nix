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
      unit = "${wlib.unitFor name ws}.service";
      uid = toString cfg.user.uid;
    in
    {
      description = "Prepare the state directories and SSH host key of workspace ${name}";
      before = [ unit ];
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
      # Creates only what is missing: the server may have created the
      # directories and the host key already, and pins that key.
      script = ''
        set -eu
        state=${esc "${cfg.stateDir}/${name}"}
        install -d -m 0755 "$state"
        # gid 100 is the "users" group inside the workspaces.
        [ -d "$state/workspace" ] || install -d -m 0755 -o ${uid} -g 100 "$state/workspace"
        [ -d "$state/claude-config" ] || install -d -m 0700 -o ${uid} -g 100 "$state/claude-config"
        [ -d "$state/ssh-host-keys" ] || install -d -m 0755 "$state/ssh-host-keys"
        key="$state/ssh-host-keys/ssh_host_ed25519_key"
        if [ ! -e "$key" ]; then
          ssh-keygen -q -t ed25519 -N "" -C ${esc name} -f "$key"
        fi
        [ -e "$state/ssh-host-keys/authorized_keys" ] \
          || install -m 0644 /dev/null "$state/ssh-host-keys/authorized_keys"
      ''
      + lib.optionalString (ws.hostKey != null) ''
        if [ "$(cut -d' ' -f1,2 "$key.pub")" != ${esc (keyTypeAndBlob ws.hostKey)} ]; then
          echo "workspace ${name}: $key.pub differs from sandboxed-workspace.workspaces.${name}.hostKey;" \
            "restore the pinned key or update hostKey (and the server's pin)" >&2
          exit 1
        fi
      ''
      + lib.optionalString (cfg.binaryCache.netrcFile != null) ''
        install -d -m 0700 /run/sandboxed-workspace/${name}
        install -m 0400 ${esc cfg.binaryCache.netrcFile} /run/sandboxed-workspace/${name}/netrc
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
