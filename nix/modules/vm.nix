# Workspaces of type "vm": microvm.nix virtual machines `sbx-NAME`, unit
# microvm@sbx-NAME.
#
# virtiofsd runs as root on the host (microvm.nix's microvm-virtiofsd@). It
# translates ids so that the guest may create and own files in a writable
# share only as the workspace user, which is the host owner; every other
# guest id (root above all) is refused, so root in the VM cannot leave a
# setuid-root program or a root-owned file there. POSIX ACLs and xattrs
# (file capabilities) are off on the shares for the same reason.
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
  minVirtiofsd = "1.13"; # --translate-uid/--translate-gid

  # virtiofsd's id translation for a writable share: the workspace user (guest
  # id u) is the workspace's host owner both ways ("map:GUEST:HOST:COUNT"); every
  # other guest id is refused ("forbid-guest:FIRST:COUNT"), up to the last id.
  translate =
    ws:
    let
      u = cfg.user.uid;
      owner = wlib.ownerFor cfg ws;
      rules = host: [
        "forbid-guest:0:${toString u}"
        "map:${toString u}:${toString host}:1"
        "forbid-guest:${toString (u + 1)}:${toString (4294967295 - u - 1)}"
      ];
    in
    map (r: "--translate-uid=${r}") (rules owner.uid) ++ map (r: "--translate-gid=${r}") (rules owner.gid);

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
            # Served read-only by virtiofsd too (not only by the host's read-only store mount).
            readOnly = true;
            posixAcl = false;
          }
        ]
        ++ map (share: {
          proto = "virtiofs";
          inherit (share) tag source readOnly;
          mountPoint = share.target;
          # microvm.nix's default, --posix-acl --xattr, would let the guest set file
          # capabilities and ACLs on the host; it also excludes id translation.
          posixAcl = false;
          extraArgs = lib.optionals (!share.readOnly) (translate ws);
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

  guestChecks =
    { config, ... }:
    {
      assertions = [
        {
          assertion = lib.versionAtLeast (lib.getVersion config.microvm.virtiofsd.package) minVirtiofsd;
          message = ''
            sandboxed-workspace: VM workspace shares need virtiofsd ${minVirtiofsd} or newer (id
            translation); microvm.virtiofsd.package is ${lib.getVersion config.microvm.virtiofsd.package}.
            Update nixpkgs.
          '';
        }
      ];
    };

  mkVm = name: ws: {
    autostart = ws.autoStart;
    restartIfChanged = true;
    config = {
      imports = [
        (import ./base.nix { inherit hostConfig name ws; })
        (guestModule name ws)
        guestChecks
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
      microvm.vms = lib.mkIf cfg.enable (
        lib.mapAttrs' (name: ws: lib.nameValuePair (wlib.machineFor name) (mkVm name ws)) vmWorkspaces
      );
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
            needs = [
              "${wlib.setupUnitFor name}.service"
              "sandboxed-workspace-firewall.service"
            ];
            afterSetup = {
              overrideStrategy = "asDropin";
              requires = needs;
              after = needs;
            };
          in
          {
            "microvm@${wlib.machineFor name}" = afterSetup;
            "microvm-virtiofsd@${wlib.machineFor name}" = afterSetup;
          }
        ) vmWorkspaces
      );
    })
  ];
}
