# Checks across workspaces, each message naming the fix. Backend-specific
# checks (microvm.nix present, Incus enabled) live with their backend.
{
  config,
  lib,
  options,
  pkgs,
  ...
}:
let
  cfg = config.sandboxed-workspace;
  wlib = import ./lib.nix { inherit lib; };
  workspaces = cfg.allWorkspaces;
  net = cfg.network;
  opt = name: field: "sandboxed-workspace.workspaces.${name}.${field}";

  perWorkspace =
    name: ws:
    [
      {
        assertion = wlib.validName name;
        message = ''
          sandboxed-workspace: workspace name "${name}" is invalid. Use lowercase letters, digits
          and '-', starting with a letter, not ending with '-', at most ${toString wlib.maxNameLength}
          characters (e.g. "web-2"): rename it.
        '';
      }
      {
        assertion = ws.type == "container" -> builtins.stringLength name <= wlib.maxContainerNameLength;
        message = ''
          sandboxed-workspace: container workspace "${name}" has ${toString (builtins.stringLength name)}
          characters; its NixOS container "${wlib.machineFor name}" may have at most 11 (the host's
          veth is "vb-" + its name), so a container workspace's name has at most
          ${toString wlib.maxContainerNameLength}. Pick a shorter name, or use type "vm" or "incus".
        '';
      }
      {
        assertion = wlib.isUsableWorkspaceIp net.subnet net.hostAddress ws.ip;
        message = ''
          sandboxed-workspace: ${opt name "ip"} = "${ws.ip}" is not a usable address of
          ${net.subnet} (it must lie inside the subnet and not be its network, broadcast or the
          host address ${toString net.hostAddress}). Pick an unused address of the subnet, or change
          sandboxed-workspace.network.subnet.
        '';
      }
    ]
    ++ map
      (field: {
        assertion = ws.type != "vm" -> ws.${field} == null;
        message = ''
          sandboxed-workspace: ${opt name field} only applies to type "vm", but "${name}" has type
          "${ws.type}". Remove ${field}, or set type = "vm".
        '';
      })
      [
        "cid"
        "vcpu"
        "memory"
      ]
    ++ map
      (pair: {
        assertion = ws.${pair.new} == null || ws.${pair.old} == null;
        message = ''
          sandboxed-workspace: ${opt name pair.new} and ${opt name pair.old} are both set; they
          mean the same. Keep ${pair.new} and remove ${pair.old}.
        '';
      })
      [
        {
          new = "cpus";
          old = "vcpu";
        }
        {
          new = "memoryMiB";
          old = "memory";
        }
      ]
    ++ map (p: {
      assertion = wlib.hasPackage pkgs p;
      message = ''
        sandboxed-workspace: ${opt name "packages"} names "${p}", which is not a package of pkgs.
        Fix the attribute path (e.g. "python3Packages.requests") or remove it.
      '';
    }) ws.packages;

  # Pairs (value, names) for values that more than one workspace uses.
  clashes =
    valueOf: wss:
    let
      byValue = lib.groupBy (n: toString (valueOf n wss.${n})) (lib.attrNames wss);
    in
    lib.filterAttrs (_: names: lib.length names > 1) byValue;

  clashAssertions =
    what: fix: valueOf: wss:
    lib.mapAttrsToList (value: names: {
      assertion = false;
      message = "sandboxed-workspace: workspaces ${lib.concatStringsSep ", " names} share the ${what} ${value}. ${fix}";
    }) (clashes valueOf wss);

  vms = lib.filterAttrs (_: ws: ws.type == "vm") workspaces;
  bothPlaces = lib.attrNames (builtins.intersectAttrs cfg.workspaces cfg.registryWorkspaces);
  registryVersion = cfg.registry.version or null;
  absoluteConfigs = lib.filterAttrs (
    _: ws: (ws.config or null) != null && lib.hasPrefix "/" ws.config
  ) (cfg.registry.workspaces or { });
  # A VM's guest module also configures what microvm.nix runs on the host as
  # root (virtiofsd and its shares, the TAP scripts, the packages they come
  # from): the registry, which the server's user writes, may not name one.
  registryVmConfigs = lib.attrNames (
    lib.filterAttrs (_: ws: (ws.type or null) == "vm" && (ws.config or null) != null) (
      cfg.registry.workspaces or { }
    )
  );

  # Containers and VMs someone else declared (the administrator's own) under a
  # workspace's `sbx-NAME`: the definitions would merge into one machine.
  foreignNames =
    option: ours:
    lib.concatMap (d: lib.attrNames d.value) (
      lib.filter (d: d.file != toString ours) (option.definitionsWithLocations or [ ])
    );
  machineClashes =
    what: optionPath: option: ours: type:
    let
      theirs = foreignNames option ours;
      clashing = lib.filterAttrs (
        name: ws: ws.type == type && lib.elem (wlib.machineFor name) theirs
      ) workspaces;
    in
    lib.mapAttrsToList (name: _: {
      assertion = false;
      message = ''
        sandboxed-workspace: workspace ${name} is the ${what} ${wlib.machineFor name}, which another
        module declares too (${optionPath}."${wlib.machineFor name}"); the two would merge into one. Rename
        your own ${what} (names starting with "${wlib.namePrefix}" belong to the workspaces), or the workspace.
      '';
    }) clashing;
  ipv4Nameservers = lib.filter (a: wlib.parseIPv4 a == null) net.nameservers;
  egressWithoutNat = lib.attrNames (lib.filterAttrs (_: ws: ws.egress == "internet") workspaces);
in
{
  config = lib.mkIf cfg.enable {
    assertions =
      [
        {
          assertion = wlib.parseSubnet net.subnet != null;
          message = ''
            sandboxed-workspace.network.subnet = "${net.subnet}" is not an IPv4 subnet of at least
            4 addresses in CIDR notation; use e.g. "192.168.83.0/24".
          '';
        }
        {
          assertion = net.hostAddress != null && wlib.ipInSubnet net.subnet net.hostAddress;
          message = ''
            sandboxed-workspace.network.hostAddress = "${toString net.hostAddress}" is not a host address
            inside ${net.subnet}; remove it to use the subnet's first address, or fix it.
          '';
        }
        {
          assertion = bothPlaces == [ ];
          message = ''
            sandboxed-workspace: workspaces ${lib.concatStringsSep ", " bothPlaces} are declared in
            sandboxed-workspace.workspaces and in the registry file ${toString cfg.registryFile}.
            Remove one of the two (the server manages the registry: `sandbox-mcp rm NAME`, or delete
            the declaration).
          '';
        }
        {
          assertion = cfg.registryFile == null || registryVersion == 1;
          message = ''
            sandboxed-workspace: the registry file ${toString cfg.registryFile} has version
            ${builtins.toJSON registryVersion}; this module reads version 1. Update sandbox-mcp and this
            module together.
          '';
        }
        {
          assertion = cfg.stateDir != "/";
          message = ''
            sandboxed-workspace.stateDir = "/": the state directory is bind-mounted nosuid,nodev onto
            itself; give the workspaces a directory of their own (e.g. "/var/lib/sandboxed-workspace").
          '';
        }
        {
          assertion = registryVmConfigs == [ ];
          message = ''
            sandboxed-workspace: the registry ${toString cfg.registryFile} names a config module for the
            VM workspaces ${lib.concatStringsSep ", " registryVmConfigs}. A VM's module also sets what
            microvm.nix runs on the host as root (microvm.shares, microvm.binScripts, nixpkgs.overlays),
            and the registry is written by the server's user: set their "config" to null (an
            up-to-date server writes none for VMs), and declare extra configuration for a VM in
            sandboxed-workspace.workspaces yourself.
          '';
        }
        {
          assertion = ipv4Nameservers == [ ];
          message = ''
            sandboxed-workspace.network.nameservers has ${lib.concatStringsSep ", " ipv4Nameservers}, which
            are not IPv4 addresses; the workspaces' network policy names IPv4 resolvers only.
          '';
        }
        {
          assertion = egressWithoutNat != [ ] -> net.nat;
          message = ''
            sandboxed-workspace: workspaces ${lib.concatStringsSep ", " egressWithoutNat} have egress
            "internet", which goes out through NAT: set sandboxed-workspace.network.nat = true, or
            egress = "none".
          '';
        }
        {
          assertion = absoluteConfigs == { };
          message = ''
            sandboxed-workspace: the registry gives absolute config paths for
            ${lib.concatStringsSep ", " (lib.attrNames absoluteConfigs)}; they must be relative to the
            registry file's directory. Let the server rewrite the registry.
          '';
        }
      ]
      ++ lib.concatLists (lib.mapAttrsToList perWorkspace workspaces)
      ++ machineClashes "container" "containers" (options.containers or { }) ./container.nix "container"
      ++ machineClashes "VM" "microvm.vms" (options.microvm.vms or { }) ./vm.nix "vm"
      ++ clashAssertions "IP" "Give each workspace its own ip." (_: ws: ws.ip) workspaces
      ++ clashAssertions "MAC address" "MACs derive from the name: rename one of them." (
        name: _: wlib.macFor name
      ) workspaces
      ++ clashAssertions "vsock CID" "Set a distinct cid on one of them (or rename it)." wlib.effectiveCid vms;
  };
}
