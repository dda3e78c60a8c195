# Workspaces of type "container": NixOS containers (systemd-nspawn) on the
# bridge, unit container@NAME.
{ config, lib, ... }:
let
  cfg = config.sandboxed-workspace;
  wlib = import ./lib.nix { inherit lib; };
  hostConfig = config;
  prefixLength = toString (wlib.prefixLengthOf cfg.network.subnet);
  containerWorkspaces = lib.filterAttrs (_: ws: ws.type == "container") cfg.allWorkspaces;

  userns = wlib.usesUserNamespace cfg.container.privateUsers;

  mkContainer = name: ws: {
    inherit (ws) autoStart;
    # Root inside is an unprivileged uid range on the host.
    inherit (cfg.container) privateUsers;
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
          # nixos-containers.nix passes "--bind=hostPath:mountPoint"; nspawn's
          # ":idmap" option maps the owners through the user namespace, so the
          # agent's files belong to sandboxed-workspace.user.uid on the host
          # too, and root inside can read the host key.
          mountPoint = share.target + lib.optionalString userns ":idmap";
          isReadOnly = share.readOnly;
        }
      ) (wlib.sharesFor cfg name)
    );
    config = {
      imports = [ (import ./base.nix { inherit hostConfig name ws; }) ];
    };
  };

  mkUnit =
    name: ws:
    let
      limits = wlib.limitsFor cfg ws;
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
      requires = [ "${wlib.setupUnitFor name}.service" ];
      after = [ "${wlib.setupUnitFor name}.service" ];
      # nixpkgs only adds restart triggers to containers with autoStart, so a
      # running workspace started by hand would keep its old system after a
      # rebuild. The container's system path changes with its configuration,
      # which makes switch-to-configuration restart a running container@NAME.
      # nixpkgs sets restartIfChanged = false on the same unit: force ours.
      restartTriggers = [ config.containers.${name}.path ];
      restartIfChanged = lib.mkForce true;
    };
in
{
  config = lib.mkIf (cfg.enable && containerWorkspaces != { }) {
    containers = lib.mapAttrs mkContainer containerWorkspaces;
    systemd.services = lib.mapAttrs' (
      name: ws: lib.nameValuePair "container@${name}" (mkUnit name ws)
    ) containerWorkspaces;
  };
}
