# The sandboxed-workspace NixOS module: disposable workspaces for AI coding
# agents as NixOS containers, microvm.nix VMs or Incus containers, behind
# one set of options (`sandboxed-workspace`).
#
# Importable without flakes: `imports = [ ./path/to/sandbox-mcp/nix/modules ];`.
# VM workspaces additionally need microvm.nix's host module (see vm.nix);
# the flake's nixosModules.default includes it.
{
  imports = [
    ./options.nix
    ./assertions.nix
    ./network.nix
    ./host.nix
    ./container.nix
    ./vm.nix
    ./incus.nix
    ./privileges.nix
    ./daemon.nix
    ./kernel.nix
  ];
}
