# Workspaces of type "incus": an Incus system container from a NixOS LXC
# image built with the host's nixpkgs, unit incus-workspace-NAME.
#
# What the instance gets (its NIC on the bridge with the workspace's MAC, the
# shared directories, the limits) is declared as an Incus profile per
# workspace, `sandboxed-workspace-NAME`, through
# `virtualisation.incus.preseed`, which NixOS applies (creating or updating
# the profile) on every rebuild that changes it. The instance is ephemeral:
# the unit imports the image (once per build), creates a fresh instance from
# the default profile and the workspace's on every start, and stops it (which
# deletes it) on stop. Incus operations of all workspaces are serialised with
# flock, since concurrent image imports of the same alias race.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.sandboxed-workspace;
  wlib = import ./lib.nix { inherit lib; };
  hostConfig = config;
  incusWorkspaces = lib.filterAttrs (_: ws: ws.type == "incus") cfg.allWorkspaces;
  incusPackage = config.virtualisation.incus.package or pkgs.incus;
  lockFile = "/run/sandboxed-workspace-incus.lock";

  image =
    name: ws:
    (cfg.incus.nixosSystem {
      modules = [
        (
          { modulesPath, ... }:
          {
            imports = [ "${modulesPath}/virtualisation/lxc-container.nix" ];
            nixpkgs.hostPlatform = lib.mkDefault pkgs.stdenv.hostPlatform.system;
          }
        )
        (import ./base.nix { inherit hostConfig name ws; })
      ];
    }).config.system.build;

  profileFor = name: "sandboxed-workspace-${name}";

  mkProfile =
    name: ws:
    let
      limits = wlib.limitsFor cfg ws;
      uid = toString cfg.user.uid;
      owner = wlib.ownerFor cfg ws;
    in
    {
      name = profileFor name;
      description = "sandbox-mcp workspace ${name} (managed by the sandboxed-workspace NixOS module)";
      # Incus takes every config and device value as a string.
      config = {
        "limits.cpu" = toString limits.cpus;
        "limits.memory" = "${toString limits.memoryMiB}MiB";
        "limits.memory.swap" = "false";
        "limits.processes" = toString limits.tasks;
        # The guest's systemd needs nesting to set up its own namespaces.
        "security.nesting" = "true";
        # A uid range of its own, and only the workspace user passes through unshifted:
        # the agent's files are the host owner's, root inside is an unprivileged uid that
        # the shares do not know (never host root, as `shift` would make it).
        "security.idmap.isolated" = "true";
        # "uid HOST INSIDE": the workspace's owner on the host is the workspace user inside.
        "raw.idmap" = "uid ${toString owner.uid} ${uid}\ngid ${toString owner.gid} ${uid}";
      };
      devices = {
        eth0 = {
          type = "nic";
          nictype = "bridged";
          parent = cfg.network.bridge;
          hwaddr = wlib.macFor name;
          name = "eth0";
          # The port the network policy filters.
          host_name = wlib.portFor name ws;
        };
      }
      // lib.listToAttrs (
        map (
          share:
          lib.nameValuePair share.tag (
            {
              type = "disk";
              source = share.source;
              path = share.target;
              readonly = lib.boolToString share.readOnly;
            }
            # A writable share is never shifted (root inside would write as host root there):
            # raw.idmap maps its owner alone. A read-only one (the host key, the secrets) is,
            # so root inside can read what belongs to root or the server's user on the host.
            // lib.optionalAttrs share.readOnly { shift = "true"; }
          )
        ) (wlib.sharesFor cfg name)
      );
    };

  mkUnit =
    name: ws:
    let
      build = image name ws;
      instance = wlib.incusInstanceFor name;
      # A new alias per image build: a changed configuration gets a new image.
      alias = "sandboxed-workspace-${name}-${builtins.substring 0 12 (builtins.hashString "sha256" "${build.tarball}")}";
      esc = lib.escapeShellArg;
      start = pkgs.writeShellScript "incus-workspace-${name}-start" ''
        set -euo pipefail
        exec 9>${lockFile}
        flock 9
        if ! incus image alias list --format csv | cut -d, -f1 | grep -qxF ${esc alias}; then
          incus image import ${build.metadata}/tarball/*.tar.xz ${build.tarball}/tarball/*.tar.xz --alias ${esc alias}
        fi
        # A stale instance survives a host crash; start from a clean one.
        incus delete --force ${esc instance} >/dev/null 2>&1 || true
        # The default profile gives the root disk; the workspace's (preseed) the rest.
        incus create --ephemeral ${esc alias} ${esc instance} --profile default --profile ${esc (profileFor name)}
        incus start ${esc instance}
        # Drop this workspace's images of earlier builds.
        incus image alias list --format csv | cut -d, -f1 \
          | grep -E '^sandboxed-workspace-${name}-[0-9a-f]{12}$' | grep -vxF ${esc alias} \
          | xargs -r -n1 incus image delete || true
      '';
      stop = pkgs.writeShellScript "incus-workspace-${name}-stop" ''
        set -uo pipefail
        exec 9>${lockFile}
        flock 9
        # Stopping an ephemeral instance deletes it.
        incus stop --force ${esc instance} >/dev/null 2>&1 || true
        incus delete --force ${esc instance} >/dev/null 2>&1 || true
      '';
    in
    {
      description = "Incus workspace ${name}";
      # incus-preseed.service (NixOS, since the preseed is set) applies the profiles.
      requires = [
        "incus.service"
        "incus-preseed.service"
        "${wlib.setupUnitFor name}.service"
        "sandboxed-workspace-firewall.service"
      ];
      after = [
        "incus.service"
        "incus-preseed.service"
        "${wlib.setupUnitFor name}.service"
        "sandboxed-workspace-firewall.service"
      ];
      wantedBy = lib.optional ws.autoStart "multi-user.target";
      path = [
        incusPackage
        pkgs.util-linux
        pkgs.coreutils
        pkgs.gnugrep
        pkgs.findutils
      ];
      # A rebuild that changes the image restarts a running workspace on it.
      restartIfChanged = true;
      restartTriggers = [
        build.tarball
        build.metadata
      ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${start}";
        ExecStop = "${stop}";
        TimeoutStartSec = "10min";
      };
    };
in
{
  config = lib.mkIf (cfg.enable && incusWorkspaces != { }) {
    assertions = [
      {
        assertion = config.virtualisation.incus.enable or false;
        message = ''
          sandboxed-workspace: workspaces ${lib.concatStringsSep ", " (lib.attrNames incusWorkspaces)} have
          type "incus". Set `virtualisation.incus.enable = true;` (Incus on NixOS also needs
          `networking.nftables.enable = true;`), or change their type.
        '';
      }
    ];
    # Profiles of removed workspaces stay in Incus (a preseed only creates and
    # updates); `incus profile delete sandboxed-workspace-NAME` removes one.
    virtualisation.incus.preseed.profiles = lib.mapAttrsToList mkProfile incusWorkspaces;
    # raw.idmap maps a host id into a container only where root may delegate it.
    # One id each for every owner (the same id twice is one range).
    users.users.root.subUidRanges = map (uid: {
      startUid = uid;
      count = 1;
    }) (lib.unique (lib.mapAttrsToList (_: ws: (wlib.ownerFor cfg ws).uid) incusWorkspaces));
    users.users.root.subGidRanges = map (gid: {
      startGid = gid;
      count = 1;
    }) (lib.unique (lib.mapAttrsToList (_: ws: (wlib.ownerFor cfg ws).gid) incusWorkspaces));
    systemd.services = lib.mapAttrs' (
      name: ws: lib.nameValuePair "incus-workspace-${name}" (mkUnit name ws)
    ) incusWorkspaces;
  };
}
