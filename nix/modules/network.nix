# The host's side of the workspace network: the bridge (systemd-networkd,
# which also enslaves the VMs' TAP devices), the network policy (nftables),
# NAT, DNS on the bridge, and NetworkManager told to leave the workspaces'
# interfaces alone.
#
# The policy is direct mode's (sandbox_mcp/hostnet/firewall.py), rendered
# from ./firewall-template.json, which is generated from firewall.py and
# checked against it by the tests: per-port anti-spoofing, no traffic between
# workspaces, nothing of the host reachable but replies to its own
# connections (its SSH to the workspaces) and, for workspaces with egress,
# DNS; egress "internet" out through NAT except to private, link-local, CGNAT
# and reserved ranges; egress "none" (the default) reaches nothing outside.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.sandboxed-workspace;
  wlib = import ./lib.nix { inherit lib; };
  br = cfg.network.bridge;
  prefixLength = toString (wlib.prefixLengthOf cfg.network.subnet);
  vmNames = lib.attrNames (lib.filterAttrs (_: ws: ws.type == "vm") cfg.allWorkspaces);

  tpl = lib.importJSON ./firewall-template.json;
  ph = tpl.placeholders;
  # firewall.table_name / _port_chain: nft identifiers keep letters, digits and '_'.
  nftIdent = lib.replaceStrings [ "-" "." ] [ "_" "_" ];
  table = "sandbox_mcp_" + nftIdent br;
  nameservers = if cfg.network.dns then [ ] else cfg.network.nameservers;
  localDns = if cfg.network.dns then cfg.network.hostAddress else null;
  dropLinesWith =
    needle: text: lib.concatStringsSep "\n" (lib.filter (l: !lib.hasInfix needle l) (lib.splitString "\n" text));
  base =
    lib.replaceStrings
      [ ph.table ph.bridge ph.subnet ph.nameservers ph.localDns ]
      [ table br cfg.network.subnet (lib.concatStringsSep ", " nameservers) (toString localDns) ]
      (
        lib.pipe tpl.base [
          (t: if nameservers == [ ] then dropLinesWith ph.nameservers t else t)
          (t: if localDns == null then dropLinesWith ph.localDns t else t)
        ]
      );
  admit =
    name: ws:
    let
      port = wlib.portFor name ws;
    in
    lib.replaceStrings
      [ ph.table ph.chain ph.port ph.bridge ph.mac ph.ip ]
      [ table "port_${nftIdent port}" port br (wlib.macFor name) ws.ip ]
      (if ws.egress == "internet" then tpl.portWithEgress else tpl.port);
  ruleset = base + lib.concatStrings (lib.mapAttrsToList admit cfg.allWorkspaces);
  rulesetFile = pkgs.writeText "sandboxed-workspace-${br}.nft" ruleset;
  nft = "${pkgs.nftables}/bin/nft";
in
{
  options.sandboxed-workspace.network.ruleset = lib.mkOption {
    type = lib.types.str;
    internal = true;
    readOnly = true;
    default = ruleset;
    defaultText = lib.literalMD "the nft script of the network policy for every workspace";
    description = ''
      The nftables script `sandboxed-workspace-firewall.service` loads: two tables
      `sandbox_mcp_BRIDGE` (bridge and inet), the same policy as sandbox-mcp's direct mode.
    '';
  };

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

      {
        # Loaded before any workspace starts (their units require it) and replaced as one
        # transaction when it changes: a rebuild reloads the unit rather than restarting it,
        # since a restart would restart every workspace that requires it.
        systemd.services.sandboxed-workspace-firewall = {
          description = "Network policy of the sandboxed workspaces (nftables tables ${table})";
          wantedBy = [ "multi-user.target" ];
          reloadIfChanged = true;
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = "${nft} -f ${rulesetFile}";
            ExecReload = "${nft} -f ${rulesetFile}";
          };
        };
      }

      (lib.mkIf (config.networking.nftables.enable or false) {
        # NixOS's nftables.service replaces the whole ruleset when it starts or reloads
        # (flushRuleset): put ours back each time.
        systemd.services.sandboxed-workspace-firewall = {
          after = [ "nftables.service" ];
          unitConfig.ReloadPropagatedFrom = [ "nftables.service" ];
        };
        systemd.services.nftables.postStart = "${nft} -f ${rulesetFile}";
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
