# Host kernel limits for container workspaces, as nixpkgs' incus.nix sets them.
# Every nspawn container's user namespace is made by root (container@NAME, or
# the daemon in direct mode), and the kernel charges the inotify instances and
# watches of everything inside to that owner: all containers share host root's
# fs.inotify.max_user_instances (128 by default, about 20 workspaces).
# sandbox_mcp/sysctls.py has the measurement; tests keep the values equal.
{ config, lib, ... }:
let
  cfg = config.sandboxed-workspace;
  containers = lib.filterAttrs (_: ws: ws.type == "container") cfg.allWorkspaces;
  # Weaker than lib.mkDefault (1000), and than incus.nix's 1050: sysctl values
  # take one definition at the winning priority, so a mkDefault here would
  # clash with xserver.nix's mkDefault 524288 (and 1050 with incus.nix). Any
  # such module's value is higher than a few workspaces need anyway; a user's
  # plain definition wins over all of them.
  weak = lib.mkOverride 1100;
in
{
  config = lib.mkIf (cfg.enable && (containers != { } || cfg.daemon.enable)) {
    boot.kernel.sysctl = {
      "fs.inotify.max_user_instances" = weak 1048576;
      "fs.inotify.max_user_watches" = weak 1048576;
    };
  };
}
