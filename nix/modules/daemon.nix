# `sandbox-mcp daemon` as a systemd service: the root daemon that owns the
# workspaces (registry, rebuilds, units), listening on a unix socket that only
# root and members of one group may use. The MCP server (`sandbox-mcp serve`)
# and the CLI then run as the user and talk to it: a NixOS user adds
# themselves to the group and registers the server, with no sudo rule at all.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.sandboxed-workspace;
  dcfg = cfg.daemon;
  socketDir = dirOf dcfg.socket;
  runtimeDirectory = lib.removePrefix "/run/" socketDir;
  nixosMode = cfg.server.flake != null && cfg.server.host != null;
in
{
  options.sandboxed-workspace.daemon = {
    enable = lib.mkEnableOption ''
      the sandbox-mcp daemon as a system service (root), reachable on
      {option}`sandboxed-workspace.daemon.socket` by members of
      {option}`sandboxed-workspace.daemon.group`. Members can create, run commands in and
      destroy workspaces (each sees only their own), which is what the group is for: add only
      people you would let use the workspaces'';

    package = lib.mkOption {
      type = lib.types.nullOr lib.types.package;
      default = pkgs.sandbox-mcp or null;
      defaultText = lib.literalExpression "pkgs.sandbox-mcp or null";
      description = ''
        The sandbox-mcp package the daemon runs. This project's flake output
        `nixosModules.default` sets it to the flake's package.
      '';
    };

    socket = lib.mkOption {
      # Under /run, so systemd makes and removes its directory (RuntimeDirectory).
      type = lib.types.strMatching "/run/[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/[A-Za-z0-9._-]+";
      default = "/run/sandbox-mcp/daemon.sock";
      description = ''
        The daemon's unix socket (`SANDBOX_MCP_DAEMON_SOCKET`, read by the daemon and by
        `sandbox-mcp serve` and the CLI). Mode 0660, owned by root and
        {option}`sandboxed-workspace.daemon.group`.
      '';
    };

    group = lib.mkOption {
      type = lib.types.strMatching "[a-z_][a-z0-9_-]{0,31}";
      default = "sandbox-mcp";
      description = ''
        The group allowed to use the daemon's socket (`SANDBOX_MCP_DAEMON_GROUP`); the module
        creates it. Add a user with `users.users.alice.extraGroups = [ "sandbox-mcp" ];`.
      '';
    };

    environment = lib.mkOption {
      type = lib.types.attrsOf lib.types.str;
      default = { };
      example = {
        SANDBOX_MCP_BOOT_TIMEOUT_S = "180";
      };
      description = ''
        More `SANDBOX_MCP_*` settings for the daemon. The module already passes the socket,
        the group, the state directory, bridge, subnet and workspace user of this module, and
        (when {option}`sandboxed-workspace.server.flake` and `.host` are set) nixos mode with
        that flake and host, escalation `none` (the daemon is root).
      '';
    };
  };

  config = lib.mkIf (cfg.enable && dcfg.enable) {
    assertions = [
      {
        assertion = dcfg.package != null;
        message = ''
          sandboxed-workspace.daemon.enable needs the sandbox-mcp package: import this project's
          flake output nixosModules.default (it sets sandboxed-workspace.daemon.package), or set
          sandboxed-workspace.daemon.package yourself.
        '';
      }
    ];
    warnings = lib.optional (cfg.server.user != null) ''
      sandboxed-workspace: both daemon.enable and server.user are set. With the daemon, the server
      runs as the user without any sudo or doas rule: remove sandboxed-workspace.server.user.
    '';

    users.groups.${dcfg.group} = { };

    systemd.services.sandbox-mcp-daemon = {
      description = "sandbox-mcp daemon: disposable workspaces for AI coding agents";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      # nixos-rebuild, systemctl, journalctl, git and nix as the host has them.
      path = [ "/run/current-system/sw" ];
      environment = {
        SANDBOX_MCP_DAEMON_SOCKET = dcfg.socket;
        SANDBOX_MCP_DAEMON_GROUP = dcfg.group;
        SANDBOX_MCP_STATE_DIR = cfg.stateDir;
        SANDBOX_MCP_BRIDGE = cfg.network.bridge;
        SANDBOX_MCP_SUBNET = cfg.network.subnet;
        SANDBOX_MCP_USER = cfg.user.name;
      }
      // lib.optionalAttrs nixosMode {
        SANDBOX_MCP_MODE = "nixos";
        SANDBOX_MCP_NIXOS_FLAKE = cfg.server.flake;
        SANDBOX_MCP_NIXOS_HOST = cfg.server.host;
        SANDBOX_MCP_NIXOS_ESCALATION = "none";
      }
      // dcfg.environment;
      serviceConfig = {
        ExecStart = "${lib.getExe dcfg.package} daemon";
        # The socket's directory; the socket itself (0660, root:group) keeps others out.
        RuntimeDirectory = runtimeDirectory;
        RuntimeDirectoryMode = "0755";
        Restart = "on-failure";
        RestartSec = "2s";
      };
      # The daemon runs nixos-rebuild switch in its own cgroup: restarting it on a
      # change would kill that rebuild half-way. Restart it by hand after updating.
      restartIfChanged = false;
    };
  };
}
