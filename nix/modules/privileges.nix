# sudo and doas rules that let the sandbox-mcp server's user run exactly the
# commands the server runs as root in nixos mode, and nothing else, so that
# user need not be root-equivalent:
#
#   nixos-rebuild switch --flake FLAKE#HOST
#   systemctl start|stop UNIT      (container@sbx-NAME, microvm@sbx-NAME, incus-workspace-NAME)
#
# These are sandbox_mcp/hostcmd.py's argv (nixos_rebuild_argv, systemctl_argv)
# word for word; tests/test_nix.py compares them. The server reads unit state
# (`systemctl show`) and logs (`journalctl`) without escalation. A rule per
# workspace: the server adds a workspace by rebuilding, which installs its
# rules before the server starts its unit.
{
  config,
  lib,
  ...
}:
let
  cfg = config.sandboxed-workspace;
  srv = cfg.server;
  wlib = import ./lib.nix { inherit lib; };
  enabled = cfg.enable && srv.user != null && srv.flake != null && srv.host != null;

  # Word lists, as the server runs them (after `sudo -n` / `doas -n`).
  rebuild = [
    "nixos-rebuild"
    "switch"
    "--flake"
    "${srv.flake}#${srv.host}"
  ];
  systemctl = lib.concatLists (
    lib.mapAttrsToList (
      name: ws:
      map (action: [
        "systemctl"
        action
        (wlib.unitFor name ws)
      ]) srv.systemctlActions
    ) cfg.allWorkspaces
  );
  commands = [ rebuild ] ++ systemctl;

  # sudo finds the program on the caller's PATH and matches it by file
  # identity, so the rule names NixOS's system profile. NixOS writes
  # commands into sudoers as given: escape what sudoers reads specially in
  # arguments ('#' would start a comment and cut "FLAKE#HOST" short).
  sudoEscape = lib.replaceStrings [ "\\" "," ":" "=" "#" ] [ "\\\\" "\\," "\\:" "\\=" "\\#" ];
  sudoCommand =
    words:
    lib.concatStringsSep " " (
      [ "/run/current-system/sw/bin/${lib.head words}" ] ++ map sudoEscape (lib.tail words)
    );

  # doas compares `cmd` with the command as typed and searches its own safe
  # PATH (on NixOS the system profile); doas.conf is not escaped by NixOS
  # either, and '#' starts a comment there too: quote every argument.
  doasQuote = word: "\"${lib.replaceStrings [ "\\" "\"" ] [ "\\\\" "\\\"" ] word}\"";
in
{
  options.sandboxed-workspace.server = {
    user = lib.mkOption {
      type = lib.types.nullOr (lib.types.strMatching "[a-z_][a-z0-9_-]{0,31}");
      default = null;
      example = "alice";
      description = ''
        The host user the sandbox-mcp server runs as in nixos mode. When set (together
        with {option}`sandboxed-workspace.server.flake` and
        {option}`sandboxed-workspace.server.host`), the module installs sudo or doas rules
        (see {option}`sandboxed-workspace.server.escalation`) that let this user run,
        without a password, exactly the commands the server runs as root: the rebuild of
        that flake and host, and start/stop of each workspace's unit. Nothing else.
        Leave it `null` when the server runs as root or through the daemon
        ({option}`sandboxed-workspace.daemon.enable`).
      '';
    };
    escalation = lib.mkOption {
      type = lib.types.enum [
        "sudo"
        "doas"
      ];
      default = "sudo";
      description = "Which rules to install; must equal the server's `nixos.escalation` (`SANDBOX_MCP_NIXOS_ESCALATION`).";
    };
    flake = lib.mkOption {
      # No spaces or quoting characters: the rule must name exactly one word.
      type = lib.types.nullOr (lib.types.strMatching "/[A-Za-z0-9._+@/-]*");
      default = null;
      example = "/etc/nixos";
      description = "The server's `nixos.flake` (`SANDBOX_MCP_NIXOS_FLAKE`): the flake directory it rebuilds.";
    };
    host = lib.mkOption {
      type = lib.types.nullOr (lib.types.strMatching "[A-Za-z0-9_][A-Za-z0-9_-]{0,62}");
      default = null;
      example = "fry";
      description = "The server's `nixos.host` (`SANDBOX_MCP_NIXOS_HOST`): the `nixosConfigurations` attribute it rebuilds.";
    };
    systemctlActions = lib.mkOption {
      type = lib.types.listOf (
        lib.types.enum [
          "start"
          "stop"
          "restart"
          "reset-failed"
        ]
      );
      default = [
        "start"
        "stop"
      ];
      description = "The `systemctl` actions on workspace units the rules allow; the server uses start and stop.";
    };
    commands = lib.mkOption {
      type = lib.types.listOf (lib.types.listOf lib.types.str);
      internal = true;
      readOnly = true;
      default = if enabled then commands else [ ];
      defaultText = lib.literalMD "the rebuild and the start/stop of every workspace's unit";
      description = "The commands (word lists) the rules allow, for tests and `sandbox-mcp doctor`.";
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = srv.user != null -> srv.flake != null && srv.host != null;
            message = ''
              sandboxed-workspace.server.user is set, but server.flake or server.host is not: the rules
              name the exact rebuild. Set sandboxed-workspace.server.flake (e.g. "/etc/nixos") and
              sandboxed-workspace.server.host to the server's SANDBOX_MCP_NIXOS_FLAKE and
              SANDBOX_MCP_NIXOS_HOST.
            '';
          }
          {
            assertion = enabled && srv.escalation == "doas" -> config.security.doas.enable or false;
            message = ''
              sandboxed-workspace.server.escalation = "doas" needs doas: set
              `security.doas.enable = true;`, or use escalation "sudo".
            '';
          }
        ];
      }
      (lib.mkIf (enabled && srv.escalation == "sudo") {
        security.sudo.extraRules = [
          {
            users = [ srv.user ];
            runAs = "root";
            commands = map (words: {
              command = sudoCommand words;
              options = [ "NOPASSWD" ];
            }) commands;
          }
        ];
      })
      (lib.mkIf (enabled && srv.escalation == "doas") {
        security.doas.extraRules = map (words: {
          users = [ srv.user ];
          runAs = "root";
          noPass = true;
          cmd = lib.head words;
          args = map doasQuote (lib.tail words);
        }) commands;
      })
    ]
  );
}
