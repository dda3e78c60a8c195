# Workspaces of type "container": NixOS containers (systemd-nspawn) on the
# bridge, container `sbx-NAME`, unit container@sbx-NAME.
#
# Root inside is an unprivileged uid range of the host (privateUsers), and
# the shares are idmapped so that only the workspace user's files are the
# host owner's: `owneridmap` maps the owner of the mount point inside (the
# workspace user, which the unit prepares) to the owner of the directory on
# the host, and nobody else; root inside writes nothing there. The host keys
# and secrets are mounted read-only with `rootidmap` (root inside reads them
# as their owner). Both options came with systemd 255 (rootidmap with 252).
{
  config,
  lib,
  ...
}:
let
  cfg = config.sandboxed-workspace;
  wlib = import ./lib.nix { inherit lib; };
  hostConfig = config;
  prefixLength = toString (wlib.prefixLengthOf cfg.network.subnet);
  containerWorkspaces = lib.filterAttrs (_: ws: ws.type == "container") cfg.allWorkspaces;
  privateUsers = cfg.container.privateUsers;
  userns = wlib.usesUserNamespace privateUsers;
  systemdVersion = config.systemd.package.version or null;
  minSystemd = "255";

  # nixos-containers.nix passes "--bind[-ro]=hostPath:mountPoint", so the
  # nspawn mount options ride on the mount point.
  idmapFor = share: lib.optionalString userns (if share.readOnly then ":rootidmap" else ":owneridmap");

  mkContainer = name: ws: {
    inherit (ws) autoStart;
    inherit privateUsers;
    # A clean root on every start; only the shared directories persist.
    ephemeral = true;
    privateNetwork = true;
    hostBridge = cfg.network.bridge;
    localAddress = "${ws.ip}/${prefixLength}";
    # Deterministic, so neighbours' ARP caches stay right across restarts.
    localMacAddress = wlib.macFor name;
    restartIfChanged = true;
    bindMounts = lib.listToAttrs (
      map (
        share:
        lib.nameValuePair share.target {
          hostPath = share.source;
          mountPoint = share.target + idmapFor share;
          isReadOnly = share.readOnly;
        }
      ) (wlib.sharesFor cfg name)
    );
    config = {
      imports = [ (import ./base.nix { inherit hostConfig name ws; }) ];
    };
  };

  # owneridmap maps the owner of the mount point as nspawn finds it: make the
  # writable shares' mount points in the (fresh, ephemeral) root, owned by the
  # workspace user, before nspawn starts. nspawn shifts the root's owners
  # into the container's range (by idmapping the root or chowning it), so
  # uid N here is uid N inside.
  mountPoints =
    name:
    let
      uid = toString cfg.user.uid;
      writable = lib.filter (s: !s.readOnly) (wlib.sharesFor cfg name);
    in
    lib.concatMapStrings (share: ''
      mkdir -p "$root"${lib.escapeShellArg share.target}
      chown -h ${uid}:${uid} "$root"${lib.escapeShellArg share.target}
    '') writable;

  mkUnit =
    name: ws:
    let
      limits = wlib.limitsFor cfg ws;
      needs = [
        "${wlib.setupUnitFor name}.service"
        "sandboxed-workspace-firewall.service"
      ];
    in
    {
      # Limits on the unit's cgroup, which holds the whole container.
      serviceConfig = {
        CPUQuota = "${toString (limits.cpus * 100)}%";
        MemoryMax = "${toString limits.memoryMiB}M";
        # Swap would let the container go past MemoryMax.
        MemorySwapMax = "0";
        TasksMax = limits.tasks;
      };
      preStart = lib.mkIf userns (mountPoints name);
      requires = needs;
      after = needs;
      # nixpkgs only adds restart triggers to containers with autoStart, so a
      # running workspace started by hand would keep its old system after a
      # rebuild. The container's system path changes with its configuration,
      # which makes switch-to-configuration restart a running container@NAME.
      # nixpkgs sets restartIfChanged = false on the same unit: force ours.
      restartTriggers = [ config.containers.${wlib.machineFor name}.path ];
      restartIfChanged = lib.mkForce true;
    };
in
{
  config = lib.mkIf (cfg.enable && containerWorkspaces != { }) {
    assertions = [
      {
        assertion = userns || cfg.container.allowRootOnHost;
        message = ''
          sandboxed-workspace.container.privateUsers = ${builtins.toJSON privateUsers} makes root inside
          every container workspace root on the host (the agent has sudo inside). Use "pick" (the
          default) or a uid range; if this host really cannot run user namespaces, set
          sandboxed-workspace.container.allowRootOnHost = true to accept that.
        '';
      }
      {
        assertion = builtins.isInt privateUsers -> lib.mod privateUsers 65536 == 0;
        message = ''
          sandboxed-workspace.container.privateUsers = ${toString privateUsers} is not a multiple of
          65536: give the first uid of a range of 65536 that no other user or container uses, or "pick".
        '';
      }
      {
        assertion = userns -> systemdVersion != null && lib.versionAtLeast systemdVersion minSystemd;
        message = ''
          sandboxed-workspace: container workspaces map their shares with systemd-nspawn's
          "owneridmap" bind option, which needs systemd ${minSystemd} or newer; this host's
          systemd.package is ${toString systemdVersion}. Update nixpkgs (NixOS 24.05 has 255), or use
          type "vm" or "incus".
        '';
      }
    ];
    containers = lib.mapAttrs' (
      name: ws: lib.nameValuePair (wlib.machineFor name) (mkContainer name ws)
    ) containerWorkspaces;
    systemd.services = lib.mapAttrs' (
      name: ws: lib.nameValuePair (wlib.unitFor name ws) (mkUnit name ws)
    ) containerWorkspaces;
  };
}
