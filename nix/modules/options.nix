# Every option of the module, under `sandboxed-workspace`.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.sandboxed-workspace;
  wlib = import ./lib.nix { inherit lib; };

  workspaceModule =
    { name, ... }:
    {
      options = {
        type = lib.mkOption {
          type = lib.types.enum [
            "container"
            "vm"
            "incus"
          ];
          example = "vm";
          description = ''
            How the workspace runs: `container` (a NixOS container `sbx-NAME`, systemd-nspawn,
            unit `container@sbx-NAME`), `vm` (a microvm.nix virtual machine `sbx-NAME`, unit
            `microvm@sbx-NAME`; needs microvm.nix's host module) or `incus` (an Incus/LXC
            container, unit `incus-workspace-NAME`; needs `virtualisation.incus.enable`).
            Containers share the host kernel; VMs isolate it. The `sbx-` prefix keeps the
            workspaces apart from containers and VMs you declare yourself.
          '';
        };

        ip = lib.mkOption {
          type = lib.types.str;
          example = "192.168.83.20";
          description = ''
            The workspace's static IPv4 address. It must lie inside
            {option}`sandboxed-workspace.network.subnet`, differ from the host address and be
            unique among workspaces. The host resolves it as `workspace-NAME`.
          '';
        };

        egress = lib.mkOption {
          type = lib.types.enum [
            "none"
            "internet"
          ];
          default = "none";
          example = "internet";
          description = ''
            What the workspace may reach beyond the host's SSH to it (the server's `egress`):
            `none` reaches nothing outside, not even DNS; `internet` goes out through the host's
            NAT (needs {option}`sandboxed-workspace.network.nat`) and may ask DNS, but never
            private ranges, link-local (169.254.169.254), loopback, CGNAT or reserved space.
            No workspace reaches another, nor any service of the host. The server's domain lists
            (egress by domain, direct mode) are not available here: the module runs no egress
            resolver, so this type refuses a list and the server refuses one in nixos mode.
          '';
        };

        packages = lib.mkOption {
          type = lib.types.listOf (lib.types.strMatching "[A-Za-z_][A-Za-z0-9_'-]*(\\.[A-Za-z_][A-Za-z0-9_'-]*)*");
          default = [ ];
          example = [
            "ripgrep"
            "python3Packages.requests"
          ];
          description = ''
            Packages installed in the workspace, as attribute paths into `pkgs`
            (`"python3Packages.requests"` is `pkgs.python3Packages.requests`). An unknown
            path is an evaluation error naming it. Strings rather than packages, so the
            server's registry (JSON) can list them too.
          '';
        };

        config = lib.mkOption {
          type = lib.types.nullOr lib.types.deferredModule;
          default = null;
          example = lib.literalExpression "./workspaces/${name}.nix";
          description = ''
            An extra NixOS module for the workspace (a path, an attribute set or a module
            function), applied on top of the shared base configuration. A VM's module also
            sets what microvm.nix runs on the host as root (`microvm.shares`,
            `microvm.binScripts`, its `pkgs`): only declare modules you would run as root.
            The server's registry may name one for containers and Incus workspaces only.
          '';
        };

        autoStart = lib.mkOption {
          type = lib.types.bool;
          default = false;
          description = "Whether the workspace starts at boot.";
        };

        cid = lib.mkOption {
          type = lib.types.nullOr (lib.types.ints.between 3 4294967294);
          default = null;
          defaultText = lib.literalMD "derived from the name: 100 + the first 24 bits of sha256(name)";
          example = 42;
          description = ''
            The VM's vsock context identifier (type `vm` only). `null` derives it from
            the name. CIDs must be unique among VMs on the host.
          '';
        };

        cpus = lib.mkOption {
          type = lib.types.nullOr lib.types.ints.positive;
          default = null;
          defaultText = lib.literalMD ''
            {option}`sandboxed-workspace.vm.vcpu` for VMs, else
            {option}`sandboxed-workspace.limits.cpus`
          '';
          example = 2;
          description = ''
            CPUs the workspace may use: a VM's virtual CPUs, or a container's CPU quota
            (`CPUQuota` of its unit, 100 % per CPU; Incus `limits.cpu`). The server's
            `cpus` argument of `create_workspace`.
          '';
        };

        memoryMiB = lib.mkOption {
          type = lib.types.nullOr lib.types.ints.positive;
          default = null;
          defaultText = lib.literalMD ''
            {option}`sandboxed-workspace.vm.memory` for VMs, else
            {option}`sandboxed-workspace.limits.memoryMiB`
          '';
          example = 2048;
          description = ''
            Memory of the workspace in MiB: a VM's RAM, or a container's hard limit
            (`MemoryMax` of its unit, no swap; Incus `limits.memory`). Beyond it the kernel's
            OOM killer ends processes inside the workspace, not on the host. The server's
            `memory_mib` argument of `create_workspace`.
          '';
        };

        tasks = lib.mkOption {
          type = lib.types.nullOr lib.types.ints.positive;
          default = null;
          defaultText = lib.literalExpression "config.sandboxed-workspace.limits.tasks";
          example = 1024;
          description = ''
            Most processes and threads a container workspace may have at once (`TasksMax`
            of its unit; Incus `limits.processes`), so a fork bomb stays inside. VMs have
            their own kernel and ignore it.
          '';
        };

        vcpu = lib.mkOption {
          type = lib.types.nullOr lib.types.ints.positive;
          default = null;
          defaultText = lib.literalExpression "config.sandboxed-workspace.vm.vcpu";
          example = 4;
          description = ''
            Virtual CPUs of the VM (type `vm` only); `null` takes
            {option}`sandboxed-workspace.vm.vcpu`. The older name of
            {option}`sandboxed-workspace.workspaces.<name>.cpus`; set only one of them.
          '';
        };

        memory = lib.mkOption {
          type = lib.types.nullOr lib.types.ints.positive;
          default = null;
          defaultText = lib.literalExpression "config.sandboxed-workspace.vm.memory";
          example = 8192;
          description = ''
            Memory of the VM in MiB (type `vm` only); `null` takes
            {option}`sandboxed-workspace.vm.memory`. The older name of
            {option}`sandboxed-workspace.workspaces.<name>.memoryMiB`; set only one of them.
          '';
        };

        ownerUid = lib.mkOption {
          type = lib.types.nullOr (lib.types.ints.between 1 4294967294);
          default = null;
          defaultText = lib.literalExpression "config.sandboxed-workspace.user.uid";
          example = 1001;
          description = ''
            The host user the workspace's files belong to (direct mode's owner): its
            `workspace` and `claude-config` directories are theirs, mode 0700, and the shares
            map exactly this uid to the workspace user inside (no other id inside is any host
            id). The server's registry sets it to the member of the daemon who created the
            workspace; `null` takes {option}`sandboxed-workspace.user.uid`.
          '';
        };

        ownerGid = lib.mkOption {
          type = lib.types.nullOr (lib.types.ints.between 1 4294967294);
          default = null;
          defaultText = lib.literalMD "the owner's uid as a gid";
          example = 100;
          description = ''
            The group of the workspace's files on the host (the owner's primary group), mapped
            to the workspace user's group inside. `null` takes the owner's uid as the gid.
          '';
        };

        hostKey = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
          example = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI... workspace";
          description = ''
            The public half of the workspace's SSH host key, to pin. When set, the host's
            `ssh` trusts exactly this key for `workspace-NAME`, and the setup unit refuses
            to start the workspace if the key in the state directory differs.
          '';
        };
      };
    };

  workspaceType = lib.types.attrsOf (lib.types.submodule workspaceModule);

  # The registry is data (JSON), never generated Nix. A workspace's `config`
  # there is relative to the registry file's directory, so the path stays
  # inside a flake's source when the registry is part of it.
  registry =
    if cfg.registryFile == null then
      {
        version = 1;
        authorizedKeys = [ ];
        workspaces = { };
      }
    else
      lib.importJSON cfg.registryFile;
  # An absolute `config`, or a VM's, is left out here and refused by an assertion.
  registryDir = dirOf cfg.registryFile;
  fromRegistry =
    _name: ws:
    (removeAttrs ws [ "config" ])
    # Never a VM's (an assertion says why): it would configure the host.
    // lib.optionalAttrs (ws.config or null != null && !lib.hasPrefix "/" ws.config && ws.type or null != "vm") {
      config = registryDir + "/${ws.config}";
    };
in
{
  options.sandboxed-workspace = {
    enable = lib.mkEnableOption "sandboxed workspaces for AI coding agents (containers, microVMs, Incus)";

    user = {
      name = lib.mkOption {
        type = lib.types.strMatching "[a-z_][a-z0-9_-]{0,31}";
        default = "agent";
        example = "alice";
        description = ''
          The user inside every workspace (not a host user). Commands from the MCP server
          run as this user; it has passwordless `doas` and `sudo`. Must equal the server's
          `user` setting (`SANDBOX_MCP_USER`).
        '';
      };
      uid = lib.mkOption {
        type = lib.types.ints.between 1000 60000;
        default = 1000;
        description = ''
          The workspace user's uid. Files in the shared workspace directory are owned by
          it on the host too, so matching your host user's uid keeps them editable.
        '';
      };
      authorizedKeys = lib.mkOption {
        type = lib.types.listOf lib.types.singleLineStr;
        default = [ ];
        example = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI... alice@laptop" ];
        description = ''
          SSH public keys allowed to log in as the workspace user. The registry's
          `authorizedKeys` (the MCP server's client key) are added to these.
        '';
      };
    };

    stateDir = lib.mkOption {
      type = lib.types.strMatching "/.*[^/]|/";
      default = "/var/lib/sandboxed-workspace";
      example = "/home/alice/sandboxed";
      description = ''
        Host directory holding each workspace's persistent state:
        `NAME/workspace` (shared at `~/workspace`), `NAME/ssh-host-keys` (the pinned host
        key and `authorized_keys`, at `/etc/ssh-host-keys`) and `NAME/claude-config`.
        Must equal the MCP server's `state_dir` (`SANDBOX_MCP_STATE_DIR`).
      '';
    };

    network = {
      bridge = lib.mkOption {
        type = lib.types.strMatching "[A-Za-z0-9_.-]{1,15}";
        default = "sandbox-br";
        description = "Name of the host bridge the workspaces attach to (`SANDBOX_MCP_BRIDGE` of the server).";
      };
      subnet = lib.mkOption {
        type = lib.types.strMatching "[0-9]{1,3}(\\.[0-9]{1,3}){3}/[0-9]{1,2}";
        default = "192.168.83.0/24";
        description = "IPv4 subnet of the workspaces, in CIDR notation (`SANDBOX_MCP_SUBNET` of the server).";
      };
      hostAddress = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = wlib.firstHostAddress cfg.network.subnet;
        defaultText = lib.literalMD "the subnet's first host address, e.g. `192.168.83.1`";
        description = "The host's address on the bridge; the workspaces' gateway and DNS server.";
      };
      upstreamInterface = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "enp3s0";
        description = ''
          Host interface the workspaces' traffic is NATed out of. `null` masquerades out of
          any interface.
        '';
      };
      nat = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = "Whether workspaces reach outside networks through NAT on the host.";
      };
      dns = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          Whether the host answers DNS for the workspaces (dnsmasq listening only on the
          bridge address; it forwards to the host's resolvers and knows `workspace-NAME`).
          When false, workspaces use {option}`sandboxed-workspace.network.nameservers`.
        '';
      };
      nameservers = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [ "9.9.9.9" ];
        description = "DNS servers for the workspaces when {option}`sandboxed-workspace.network.dns` is false.";
      };
    };

    workspaces = lib.mkOption {
      type = workspaceType;
      default = { };
      example = lib.literalExpression ''
        {
          myproject = {
            type = "container";
            ip = "192.168.83.20";
            packages = [ "ripgrep" "nodejs" ];
            config = ./workspaces/myproject.nix;
          };
        }
      '';
      description = ''
        Workspaces declared in the NixOS configuration. Names use lowercase letters,
        digits and `-`, start with a letter and have at most 12 characters (11 for
        containers). Workspaces from {option}`sandboxed-workspace.registryFile` are added
        to these; a name may appear in only one of the two.
      '';
    };

    registryFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = lib.literalExpression "./sandboxed-workspaces.json";
      description = ''
        JSON file maintained by the sandbox-mcp server:
        `{"version": 1, "authorizedKeys": [...], "workspaces": {NAME: {type, ip, egress,
        packages, autoStart, config, cpus, memoryMiB, tasks, vcpu, memory, ownerUid, ownerGid, hostKey}}}` (each
        workspace key optional but `type` and `ip`), where `config` is null or a path
        relative to the file's directory (containers and Incus only: a VM's module would set
        what runs on the host as root, and is refused). It is read as data with
        `lib.importJSON`. Use a path literal inside your flake so pure evaluation can read it.
      '';
    };

    registryWorkspaces = lib.mkOption {
      type = workspaceType;
      internal = true;
      readOnly = true;
      default = lib.mapAttrs fromRegistry (registry.workspaces or { });
      defaultText = lib.literalMD "the workspaces of {option}`sandboxed-workspace.registryFile`";
      description = "The registry's workspaces, type-checked like declared ones.";
    };

    registry = lib.mkOption {
      type = lib.types.attrs;
      internal = true;
      readOnly = true;
      default = registry;
      defaultText = lib.literalMD "the parsed {option}`sandboxed-workspace.registryFile`";
      description = "The parsed registry file, for assertions.";
    };

    allWorkspaces = lib.mkOption {
      type = lib.types.attrs;
      internal = true;
      readOnly = true;
      default = cfg.workspaces // cfg.registryWorkspaces;
      defaultText = lib.literalMD "declared workspaces and the registry's";
      description = "Every workspace the module realises.";
    };

    claude = {
      onboarding = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          Whether each workspace seeds `$CLAUDE_CONFIG_DIR/.claude.json` (when missing) with
          onboarding complete and the workspace directory trusted, so Claude Code starts
          without questions.
        '';
      };
      package = lib.mkOption {
        type = lib.types.nullOr lib.types.package;
        default = pkgs.claude-code or null;
        defaultText = lib.literalExpression "pkgs.claude-code or null";
        description = ''
          Claude Code installed in every workspace; `null` installs none. `claude-code` is
          unfree: allow it in the host's `nixpkgs.config`.
        '';
      };
      skipPermissions = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          Whether `claude` in a workspace is wrapped to pass `--dangerously-skip-permissions`.
          The workspace is the sandbox; with this off, every tool call asks for approval.
        '';
      };
    };

    execAgent.enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      example = false;
      description = ''
        Whether every workspace carries the MCP server's exec agent (`python3` and
        `sandbox_mcp/exec_agent.py` of this checkout, as bytecode), linked at
        `/usr/local/libexec/sandbox-mcp/exec-agent` and `/usr/bin/python3`, and starts it
        at boot as the workspace user to wait for the server's connection. It runs
        many commands over one SSH channel and kills a timed-out command's process group.
        Without it every command costs an SSH session, and `start_process` and the other
        process tools do not work.
      '';
    };

    binaryCache = {
      fromHost = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          Whether workspaces use the host's `nix.settings.substituters` and
          `trusted-public-keys`.
        '';
      };
      netrcFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "/run/agenix/attic-netrc";
        description = ''
          Host file with netrc credentials for the binary caches. The setup unit copies it
          to `/run/sandboxed-workspace/NAME/netrc` and each workspace reads it read-only as
          `nix.settings.netrc-file`. It is a secret the workspace (and so the agent) can
          read: set it only for caches you accept exposing.
        '';
      };
    };

    limits = {
      cpus = lib.mkOption {
        type = lib.types.ints.positive;
        default = 4;
        description = ''
          Default CPUs of a workspace (see {option}`sandboxed-workspace.workspaces.<name>.cpus`).
          Should equal the server's `cpus` setting.
        '';
      };
      memoryMiB = lib.mkOption {
        type = lib.types.ints.positive;
        default = 4096;
        description = ''
          Default memory of a workspace in MiB (see
          {option}`sandboxed-workspace.workspaces.<name>.memoryMiB`). Should equal the server's
          `memory_mib` setting.
        '';
      };
      tasks = lib.mkOption {
        type = lib.types.ints.positive;
        default = 4096;
        description = ''
          Default process and thread limit of a container workspace (see
          {option}`sandboxed-workspace.workspaces.<name>.tasks`).
        '';
      };
    };

    container.privateUsers = lib.mkOption {
      type = lib.types.either (lib.types.ints.between 65536 4294836224) (
        lib.types.enum [
          "no"
          "identity"
          "pick"
        ]
      );
      default = "pick";
      example = 1879048192;
      description = ''
        `privateUsers` of the NixOS containers: with `"pick"` (the default) root inside a
        container is an unprivileged uid range on the host, picked by systemd-nspawn; a number
        fixes the range's first uid (a multiple of 65536). The shares are idmapped so that only
        the workspace user's files are the host owner's (`owneridmap`, systemd 255+) and the
        host key is readable by root inside (`rootidmap`, read-only); root inside writes
        nothing there. `"no"` and `"identity"` make root inside root on the host and are refused
        unless {option}`sandboxed-workspace.container.allowRootOnHost` is set.
      '';
    };

    container.allowRootOnHost = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Allow {option}`sandboxed-workspace.container.privateUsers` `"no"` or `"identity"`.
        This GIVES ROOT ON THE HOST AWAY: the agent has sudo inside, and root inside such a
        container is host root (it can write a setuid-root program into the shared workspace
        directory, or take over the host through /proc and /sys). Only for hosts where user
        namespaces do not work, and only for agents you would give root.
      '';
    };

    vm = {
      hypervisor = lib.mkOption {
        type = lib.types.str;
        default = "cloud-hypervisor";
        example = "qemu";
        description = "microvm.nix hypervisor for VM workspaces.";
      };
      vcpu = lib.mkOption {
        type = lib.types.ints.positive;
        default = cfg.limits.cpus;
        defaultText = lib.literalExpression "config.sandboxed-workspace.limits.cpus";
        description = "Default virtual CPUs of a VM workspace.";
      };
      memory = lib.mkOption {
        type = lib.types.ints.positive;
        default = cfg.limits.memoryMiB;
        defaultText = lib.literalExpression "config.sandboxed-workspace.limits.memoryMiB";
        description = "Default memory of a VM workspace, in MiB.";
      };
      overlaySize = lib.mkOption {
        type = lib.types.ints.positive;
        default = 8192;
        description = ''
          Size in MiB of each VM's writable Nix store overlay volume (`overlay.img` in
          microvm.nix's state directory); it persists across restarts.
        '';
      };
    };

    incus.nixosSystem = lib.mkOption {
      type = lib.types.functionTo lib.types.raw;
      default = args: import "${toString pkgs.path}/nixos/lib/eval-config.nix" ({ system = null; } // args);
      defaultText = lib.literalExpression ''args: import "''${pkgs.path}/nixos/lib/eval-config.nix" ({ system = null; } // args)'';
      description = ''
        Function building the NixOS system of an Incus workspace image, called with
        `{ modules; }`. This flake sets it to `nixpkgs.lib.nixosSystem`; without flakes
        the host's nixpkgs is used.
      '';
    };

    stateVersion = lib.mkOption {
      type = lib.types.str;
      default = config.system.stateVersion;
      defaultText = lib.literalExpression "config.system.stateVersion";
      description = "`system.stateVersion` of the workspaces.";
    };
  };
}
