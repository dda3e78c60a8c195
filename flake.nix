{
  description = "sandbox-mcp: disposable workspaces (containers, microVMs, Incus) for AI coding agents, over MCP";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    microvm = {
      url = "github:microvm-nix/microvm.nix";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      microvm,
    }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      pyproject = builtins.fromTOML (builtins.readFile ./pyproject.toml);

      # Runtime dependencies, as in pyproject.toml. nixpkgs may lag behind
      # the pins there: mcp >= 2.3 (the 2.x API) and pyroute2 0.9 are recent.
      # If your nixpkgs has older ones, the build fails in the dependency
      # check; override them with newer versions (overridePythonAttrs)
      # rather than relaxing the pins, because the APIs differ.
      pythonDeps = ps: [
        ps.mcp
        ps.anyio
        ps.asyncssh
        ps.pydantic
        ps.pyroute2
        ps.uvicorn
      ];
    in
    {
      # The module, with microvm.nix's host module so VM workspaces work,
      # and this flake's package for the daemon service.
      # Without flakes, import ./nix/modules (and microvm.nix's host module
      # if you want VMs). Incus images are evaluated with the host's own
      # nixpkgs (eval-config.nix, what its lib.nixosSystem wraps), so they
      # share the host's pin instead of this flake's.
      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [
            ./nix/modules
            microvm.nixosModules.host
          ];
          # The daemon service (sandboxed-workspace.daemon.enable) runs this flake's package.
          sandboxed-workspace.daemon.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
      nixosModules.sandboxed-workspace = ./nix/modules;

      packages = forAllSystems (pkgs: {
        default = pkgs.python3Packages.buildPythonApplication {
          pname = "sandbox-mcp";
          inherit (pyproject.project) version;
          pyproject = true;
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./pyproject.toml
              ./sandbox_mcp
              (lib.fileset.maybeMissing ./README.md)
            ];
          };
          build-system = [ pkgs.python3Packages.setuptools ];
          dependencies = pythonDeps pkgs.python3Packages;
          # The test suite needs root, systemd-nspawn and network namespaces;
          # CI runs it. Here, only check that the package imports.
          doCheck = false;
          pythonImportsCheck = [ "sandbox_mcp" ];
          meta = {
            description = pyproject.project.description;
            license = lib.licenses.mit;
            mainProgram = "sandbox-mcp";
            platforms = lib.platforms.linux;
          };
        };
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (ps: pythonDeps ps ++ [ ps.pytest ]))
            pkgs.ruff
            pkgs.nix
          ];
        };
      });
    };
}
