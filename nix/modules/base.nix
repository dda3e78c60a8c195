# The guest configuration shared by all three backends.
#
#   import ./base.nix { inherit hostConfig name ws; }
#
# returns a NixOS module for the workspace `name` (its options `ws`). The
# backends add what differs (mounts, interfaces, image format) on top.
{
  hostConfig,
  name,
  ws,
}:
{
  lib,
  pkgs,
  ...
}:
let
  cfg = hostConfig.sandboxed-workspace;
  wlib = import ./lib.nix { inherit lib; };
  user = cfg.user.name;
  home = "/home/${user}";
  workspaceDir = "${home}/workspace";
  claudeDir = "${home}/claude-config";
  prefixLength = toString (wlib.prefixLengthOf cfg.network.subnet);
  nameservers = if cfg.network.dns then [ cfg.network.hostAddress ] else cfg.network.nameservers;
  # The registry's keys are the MCP server's client key.
  authorizedKeys = cfg.user.authorizedKeys ++ (cfg.registry.authorizedKeys or [ ]);

  claude =
    if cfg.claude.package == null then
      null
    else if cfg.claude.skipPermissions then
      # The workspace is the sandbox, so Claude Code runs without approval prompts.
      pkgs.writeShellScriptBin "claude" ''
        exec ${cfg.claude.package}/bin/claude --dangerously-skip-permissions "$@"
      ''
    else
      cfg.claude.package;

  # The server's exec agent, as bytecode of the guest's python3 (exec-agent.nix).
  agentPython = pkgs.python3;
  execAgent = import ./exec-agent.nix {
    inherit pkgs;
    python = agentPython;
  };

  onboardingJson = pkgs.writeText "claude.json" (
    builtins.toJSON {
      hasCompletedOnboarding = true;
      projects.${workspaceDir} = {
        hasTrustDialogAccepted = true;
        hasCompletedProjectOnboarding = true;
      };
    }
  );
in
{
  imports = lib.optional (ws.config != null) ws.config;

  config = lib.mkMerge [
    {
      system.stateVersion = lib.mkDefault cfg.stateVersion;
      # Above nixos-containers.nix's and microvm.nix's mkDefault of the machine name
      # (sbx-NAME), below a plain definition in the workspace's own module.
      networking.hostName = lib.mkOverride 900 name;

      # Static address on the bridge, matched by the deterministic MAC every
      # backend gives the workspace's interface, so the name of that
      # interface (eth0, host0, enp0s...) does not matter.
      networking.useDHCP = false;
      networking.useNetworkd = true;
      networking.useHostResolvConf = lib.mkForce false;
      systemd.network.enable = true;
      systemd.network.networks."10-sandboxed-workspace" = {
        matchConfig.MACAddress = wlib.macFor name;
        address = [ "${ws.ip}/${prefixLength}" ];
        gateway = [ cfg.network.hostAddress ];
        dns = nameservers;
        linkConfig.RequiredForOnline = "routable";
      };
      services.resolved.enable = true;

      # sshd with the host key generated on the host (by the server or the
      # setup unit) and pinned by the server; keys only.
      services.openssh = {
        enable = true;
        openFirewall = true;
        hostKeys = [
          {
            path = "/etc/ssh-host-keys/ssh_host_ed25519_key";
            type = "ed25519";
          }
        ];
        authorizedKeysFiles = [ "/etc/ssh-host-keys/authorized_keys" ];
        settings = {
          PasswordAuthentication = false;
          KbdInteractiveAuthentication = false;
          PermitRootLogin = "no";
        };
      };

      # The user's own group, with its uid as gid: the shares map that one id (uid and
      # gid alike) to the host owner, and no other.
      users.groups.${user}.gid = cfg.user.uid;
      users.users.${user} = {
        isNormalUser = true;
        uid = cfg.user.uid;
        group = user;
        inherit home;
        extraGroups = [ "wheel" ];
        openssh.authorizedKeys.keys = authorizedKeys;
      };
      security.doas = {
        enable = true;
        extraRules = [
          {
            users = [ user ];
            noPass = true;
            keepEnv = true;
          }
        ];
      };
      security.sudo.wheelNeedsPassword = false;

      environment.systemPackages =
        map (
          p:
          lib.attrByPath (wlib.packagePath p) (throw ''
            sandboxed-workspace: workspace ${name} lists package "${p}", which its pkgs lacks; fix the
            attribute path (e.g. "python3Packages.requests") or remove it.
          '') pkgs
        ) ws.packages
        ++ [ pkgs.git ]
        ++ lib.optional (claude != null) claude;
      environment.variables.CLAUDE_CONFIG_DIR = claudeDir;

      # Mount points exist with the right owner even before the first mount.
      systemd.tmpfiles.rules = [
        "d ${workspaceDir} 0700 ${user} ${user} -"
        "d ${claudeDir} 0700 ${user} ${user} -"
      ];
    }

    (lib.mkIf cfg.execAgent.enable {
      # Where the server starts it in a session (sandbox_mcp/paths.py EXEC_AGENT_PATH,
      # sandbox_mcp/ssh/commands.py PYTHON_PATH), as in the Debian images: the host's code is one
      # for every image.
      systemd.tmpfiles.rules = [
        "d /usr/local/libexec/sandbox-mcp 0755 root root -"
        "L+ /usr/local/libexec/sandbox-mcp/exec-agent - - - - ${execAgent}"
        "L+ /usr/bin/python3 - - - - ${agentPython.interpreter}"
      ];

      # Started at boot to wait for the server's connection (and the next, once it is gone), met through sshd's
      # socket forwarding (sandbox_mcp/ssh/agent_start.py): the Python start and its imports happen
      # while the workspace boots, not after the login. The same unit as the Debian images'
      # (sandbox_mcp/images/debootstrap.py agent_service).
      systemd.services.sandbox-mcp-agent = {
        description = "sandbox-mcp exec agent (waits for the server's connection)";
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          User = user;
          ExecStart = "${agentPython.interpreter} -I -S -u ${execAgent} --listen /run/sandbox-mcp-agent/agent.sock";
          RuntimeDirectory = "sandbox-mcp-agent";
          RuntimeDirectoryMode = "0700";
          # What the connection's commands left running (a start_process) outlives the agent, as an
          # sshd session's do.
          KillMode = "process";
          # A command the OOM killer ends is that command's end, not the agent's.
          OOMPolicy = "continue";
        };
      };
    })

    (lib.mkIf cfg.binaryCache.fromHost {
      nix.settings.substituters = hostConfig.nix.settings.substituters or [ ];
      nix.settings.trusted-public-keys = hostConfig.nix.settings.trusted-public-keys or [ ];
    })

    (lib.mkIf (cfg.binaryCache.netrcFile != null) {
      # Each backend mounts /run/sandboxed-workspace/NAME of the host here.
      nix.settings.netrc-file = "/var/lib/sandbox-secrets/netrc";
    })

    (lib.mkIf cfg.claude.onboarding {
      # Seeded once: later changes Claude Code makes to its config survive.
      systemd.services.sandboxed-workspace-claude-onboarding = {
        description = "Seed the Claude Code configuration of the workspace";
        wantedBy = [ "multi-user.target" ];
        after = [ "local-fs.target" ];
        unitConfig.RequiresMountsFor = [ claudeDir ];
        serviceConfig = {
          Type = "oneshot";
          User = user;
          RemainAfterExit = true;
        };
        script = ''
          if [ ! -e ${claudeDir}/.claude.json ]; then
            install -m 0600 ${onboardingJson} ${claudeDir}/.claude.json
          fi
        '';
      };
    })
  ];
}
