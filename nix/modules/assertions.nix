# Checks across workspaces, each message naming the fix. Backend-specific
# checks (microvm.nix present, Incus enabled) live with their backend.
{
  config,
  lib,
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
          characters; NixOS containers with a private network allow at most
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
          assertion = absoluteConfigs == { };
          message = ''
            sandboxed-workspace: the registry gives absolute config paths for
            ${lib.concatStringsSep ", " (lib.attrNames absoluteConfigs)}; they must be relative to the
            registry file's directory. Let the server rewrite the registry.
          '';
        }
      ]
      ++ lib.concatLists (lib.mapAttrsToList perWorkspace workspaces)
      ++ clashAssertions "IP" "Give each workspace its own ip." (_: ws: ws.ip) workspaces
      ++ clashAssertions "MAC address" "MACs derive from the name: rename one of them." (
        name: _: wlib.macFor name
      ) workspaces
      ++ clashAssertions "vsock CID" "Set a distinct cid on one of them (or rename it)." wlib.effectiveCid vms;
  };
}
