# The host's side of the workspace network: the bridge (systemd-networkd,
# which also enslaves the VMs' TAP devices), NAT, DNS on the bridge, and
# NetworkManager told to leave the workspaces' interfaces alone.
{ config, lib, ... }:
let
  cfg = config.sandboxed-workspace;
  wlib = import ./lib.nix { inherit lib; };
  br = cfg.network.bridge;
  prefixLength = toString (wlib.prefixLengthOf cfg.network.subnet);
  vmNames = lib.attrNames (lib.filterAttrs (_: ws: ws.type == "vm") cfg.allWorkspaces);
in
{
  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        # networkd manages only the links its files match, so this works on
        # hosts whose other interfaces use scripted networking or NM.
        systemd.network.enable = true;
        # ... provided it leaves the other managers' routes and rules alone.
        systemd.network.config.networkConfig = lib.mkIf (!(config.networking.useNetworkd or false)) {
          ManageForeignRoutes = lib.mkDefault false;
          ManageForeignRoutingPolicyRules = lib.mkDefault false;
        };
        systemd.network.netdevs."40-sandboxed-workspace" = {
          netdevConfig = {
            Kind = "bridge";
            Name = br;
          };
        };
        systemd.network.networks."40-sandboxed-workspace" = {
          matchConfig.Name = br;
          address = [ "${cfg.network.hostAddress}/${prefixLength}" ];
          networkConfig.ConfigureWithoutCarrier = true;
          linkConfig.RequiredForOnline = "no";
        };

        networking.networkmanager.unmanaged = [
          "interface-name:${br}"
          "interface-name:vb-*"
          "interface-name:vm-*"
          "interface-name:veth*"
        ];
      }

      (lib.mkIf (vmNames != [ ]) {
        # microvm.nix creates the TAPs; attaching them is the host's job.
        systemd.network.networks."41-sandboxed-workspace-taps" = {
          matchConfig.Name = map wlib.tapFor vmNames;
          networkConfig.Bridge = br;
          linkConfig.RequiredForOnline = "no";
        };
      })

      (lib.mkIf cfg.network.nat {
        networking.nat = {
          enable = true;
          internalInterfaces = [ br ];
          internalIPs = [ cfg.network.subnet ];
          externalInterface = cfg.network.upstreamInterface;
        };
      })

      (lib.mkIf cfg.network.dns {
        # dnsmasq answers on the bridge only, forwarding to the host's
        # resolvers; it reads /etc/hosts, so workspace-NAME resolves inside
        # the workspaces too. The host's own resolver is left as it was.
        services.dnsmasq = {
          enable = true;
          resolveLocalQueries = lib.mkDefault false;
          settings = {
            interface = br;
            listen-address = cfg.network.hostAddress;
            # Unlike bind-interfaces, copes with the bridge appearing after
            # dnsmasq has started.
            bind-dynamic = true;
            no-dhcp-interface = br;
          };
        };
        networking.firewall.interfaces.${br} = {
          allowedUDPPorts = [ 53 ];
          allowedTCPPorts = [ 53 ];
        };
      })
    ]
  );
}
