# Workspaces of type "vm": microvm.nix virtual machines, unit microvm@NAME.
#
# microvm.nix's host module declares `microvm.*`. This module stays
# importable without it (and without flakes): it defines `microvm.*` only
# when those options exist (`options ? microvm`), and an assertion asks for
# the host module when a VM workspace is declared without it. The flake's
# nixosModules.default imports microvm.nix's host module, so flake users
# get VMs without doing anything. Testing `options` (declarations only)
# rather than `config` keeps this free of infinite recursion.
{
  config,
  lib,
  options,
  ...
}:
let
  cfg = config.sandboxed-workspace;
  wlib = import ./lib.nix { inherit lib; };
  hostConfig = config;
  vmWorkspaces = lib.filterAttrs (_: ws: ws.type == "vm") cfg.allWorkspaces;
  haveMicrovm = options ? microvm.vms;

  guestModule = name: ws: {
    microvm = {
      hypervisor = lib.mkDefault cfg.vm.hypervisor;
      vcpu = (wlib.limitsFor cfg ws).cpus;
      mem = (wlib.limitsFor cfg ws).memoryMiB;

      # The host's store, read-only, under a writable overlay kept in a
      # volume, so `nix build` works inside the VM.
      writableStoreOverlay = "/nix/.rw-store";
      volumes = [
        {
          image = "overlay.img";
          mountPoint = "/nix/.rw-store";
          size = cfg.vm.overlaySize;
        }
      ];
      shares =
        [
          {
            proto = "virtiofs";
            tag = "ro-store";
            source = "/nix/store";
            mountPoint = "/nix/.ro-store";
          }
        ]
        ++ map (share: {
          proto = "virtiofs";
          inherit (share) tag source readOnly;
          mountPoint = share.target;
        }) (wlib.sharesFor cfg name);

      interfaces = [
        {
          type = "tap";
          id = wlib.tapFor name;
          mac = wlib.macFor name;
        }
      ];

      # cloud-hypervisor passes systemd's READY=1 over vsock, so microvm@NAME
      # knows when the guest has booted.
      vsock.cid = wlib.effectiveCid name ws;
    };
  };

  mkVm = name: ws: {
    autostart = ws.autoStart;
    restartIfChanged = true;
    config = {
      imports = [
        (import ./base.nix { inherit hostConfig name ws; })
        (guestModule name ws)
      ];
    };
  };
in
{
  config = lib.mkMerge [
    {
      assertions = [
        {
          assertion = cfg.enable && vmWorkspaces != { } -> haveMicrovm;
          message = ''
            sandboxed-workspace: workspaces ${lib.concatStringsSep ", " (lib.attrNames vmWorkspaces)} have
            type "vm", which needs microvm.nix's host module. Import this project's flake output
            nixosModules.default (it includes it), or add microvm.nix's nixos-modules/host to
            `imports`, or change their type to "container".
          '';
        }
      ];
    }
    (lib.optionalAttrs haveMicrovm {
      microvm.vms = lib.mkIf cfg.enable (lib.mapAttrs mkVm vmWorkspaces);
    })
    (lib.mkIf (cfg.enable && vmWorkspaces != { }) {
      # Drop-ins for microvm.nix's template instances, as microvm.nix itself
      # does; a full unit would replace the template's ExecStart. virtiofsd
      # too waits for the setup unit: it serves the directories that unit
      # gives their owner and mode.
      systemd.services = lib.mkMerge (
        lib.mapAttrsToList (
          name: _:
          let
            afterSetup = {
              overrideStrategy = "asDropin";
              requires = [ "${wlib.setupUnitFor name}.service" ];
              after = [ "${wlib.setupUnitFor name}.service" ];
            };
          in
          {
            "microvm@${name}" = afterSetup;
            "microvm-virtiofsd@${name}" = afterSetup;
          }
        ) vmWorkspaces
      );
    })
  ];
}
