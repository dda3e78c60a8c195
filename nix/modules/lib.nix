# Pure helpers shared by the module's parts (not a module itself):
#   import ./lib.nix { inherit lib; }
#
# The MAC and vsock CID derivations must stay bit for bit equal to
# sandbox_mcp/naming.py (mac_for, cid_for); tests/test_nix.py checks that.
{ lib }:
let
  # lib.fromHexString exists since nixpkgs 24.05; older lib gets a small
  # digit lookup built from the digit string (no hand-written table).
  hexDigitValues = lib.listToAttrs (
    lib.imap0 (i: d: lib.nameValuePair d i) (lib.stringToCharacters "0123456789abcdef")
  );
  fromHexFallback =
    s: builtins.foldl' (acc: c: acc * 16 + hexDigitValues.${c}) 0 (lib.stringToCharacters (lib.toLower s));
  fromHex = if lib ? fromHexString then lib.fromHexString else fromHexFallback;

  digest = name: builtins.hashString "sha256" name;

  pow2 = n: builtins.foldl' (acc: _: acc * 2) 1 (lib.range 1 n);

  # "a.b.c.d" -> [ a b c d ] or null when it is not a dotted quad of 0-255.
  parseIPv4 =
    s:
    let
      m = builtins.match "([0-9]{1,3})\\.([0-9]{1,3})\\.([0-9]{1,3})\\.([0-9]{1,3})" s;
      octets = if m == null then null else map lib.toInt m;
    in
    if octets != null && lib.all (o: o <= 255) octets then octets else null;

  ipToInt = octets: builtins.foldl' (acc: o: acc * 256 + o) 0 octets;

  intToIp =
    n:
    lib.concatMapStringsSep "." toString [
      (n / 16777216)
      (lib.mod (n / 65536) 256)
      (lib.mod (n / 256) 256)
      (lib.mod n 256)
    ];

  # "192.168.83.0/24" -> { network (int, masked); prefixLength; size } or null.
  parseSubnet =
    s:
    let
      m = builtins.match "([0-9.]+)/([0-9]{1,2})" s;
      octets = if m == null then null else parseIPv4 (builtins.elemAt m 0);
      prefixLength = if m == null then 0 else lib.toInt (builtins.elemAt m 1);
      size = pow2 (32 - prefixLength);
    in
    if octets == null || prefixLength > 30 then
      null
    else
      {
        inherit prefixLength size;
        network = (ipToInt octets) / size * size;
      };
in
rec {
  inherit fromHex parseIPv4 parseSubnet;

  maxNameLength = 12; # "vm-" + 12 = 15, Linux's interface name limit

  # Every workspace's container, VM and unit carry this prefix, so a workspace
  # can never merge into a container or VM the administrator declared under
  # the same name. sandbox_mcp/runtimes/nixos.py uses the same one.
  namePrefix = "sbx-";
  # nixpkgs' containers with privateNetwork allow 11 characters (the host's
  # veth is "vb-" + the container name, which the network policy names), and
  # the container name is the prefix + the workspace name.
  maxContainerNameLength = 11 - builtins.stringLength namePrefix;

  # Same rule as sandbox_mcp.naming.validate_name.
  validName =
    name:
    builtins.match "[a-z][a-z0-9-]*" name != null
    && !lib.hasSuffix "-" name
    && builtins.stringLength name <= maxNameLength;

  # Locally administered unicast MAC: "02:" + the first 5 bytes of sha256(name).
  macFor =
    name:
    let
      h = digest name;
    in
    "02:" + lib.concatMapStringsSep ":" (i: builtins.substring (i * 2) 2 h) (lib.range 0 4);

  # vsock CID: 100 + the first 24 bits of sha256(name); 0-2 are reserved by
  # vsock(7) and 3-99 are left for manual assignment.
  cidFor = name: 100 + fromHex (builtins.substring 0 6 (digest name));

  # The CID a VM workspace really uses: its `cid` option, else derived.
  effectiveCid = name: ws: if ws.cid != null then ws.cid else cidFor name;

  # Is `ip` a usable workspace address of `subnet`: inside it, and not the
  # network, broadcast or host address?
  ipInSubnet =
    subnet: ip:
    let
      net = parseSubnet subnet;
      octets = parseIPv4 ip;
      n = ipToInt octets;
    in
    net != null && octets != null && n > net.network && n < net.network + net.size - 1;

  isUsableWorkspaceIp =
    subnet: hostAddress: ip:
    ipInSubnet subnet ip && ip != hostAddress;

  # The host's address on the bridge: the subnet's first host address.
  firstHostAddress =
    subnet:
    let
      net = parseSubnet subnet;
    in
    if net == null then null else intToIp (net.network + 1);

  prefixLengthOf = subnet: (parseSubnet subnet).prefixLength;

  # Values that occur more than once in a list, each once.
  duplicates =
    xs: lib.unique (lib.filter (x: lib.count (y: y == x) xs > 1) xs);

  # "python3Packages.requests" -> [ "python3Packages" "requests" ]
  packagePath = p: lib.splitString "." p;
  hasPackage = pkgs: p: lib.hasAttrByPath (packagePath p) pkgs;

  # `containers.<this>` / `microvm.vms.<this>` of a workspace.
  machineFor = name: namePrefix + name;

  unitFor =
    name: ws:
    {
      container = "container@${machineFor name}";
      vm = "microvm@${machineFor name}";
      incus = "incus-workspace-${name}";
    }
    .${ws.type};

  # The host side of the workspace's link on the bridge: the port the
  # network policy filters. nspawn names a bridged container's veth "vb-" +
  # the machine name; microvm.nix's TAP and Incus's veth get their name here.
  portFor =
    name: ws:
    {
      container = "vb-${machineFor name}";
      vm = tapFor name;
      incus = "vi-${name}";
    }
    .${ws.type};

  # A workspace's effective limits: its own, else (VMs) the older vcpu/memory
  # and the vm defaults, else the module-wide defaults.
  # The host identity a workspace's shared files belong to (sandbox_mcp/identity.py's host_identity):
  # its owner, else the workspace user's uid; the group is the owner's, else the uid as a gid.
  ownerFor =
    cfg: ws:
    let
      uid = if ws.ownerUid != null then ws.ownerUid else cfg.user.uid;
    in
    {
      inherit uid;
      gid = if ws.ownerGid != null then ws.ownerGid else uid;
    };

  limitsFor =
    cfg: ws:
    let
      pick = values: lib.findFirst (v: v != null) null values;
      isVm = ws.type == "vm";
    in
    {
      cpus = pick ([ ws.cpus ] ++ (if isVm then [ ws.vcpu cfg.vm.vcpu ] else [ cfg.limits.cpus ]));
      memoryMiB = pick ([ ws.memoryMiB ] ++ (if isVm then [ ws.memory cfg.vm.memory ] else [ cfg.limits.memoryMiB ]));
      tasks = if ws.tasks != null then ws.tasks else cfg.limits.tasks;
    };

  # Does this privateUsers value give the container a user namespace?
  usesUserNamespace = privateUsers: privateUsers == "pick" || (builtins.isInt privateUsers && privateUsers > 0);

  setupUnitFor = name: "sandboxed-workspace-setup-${name}";
  hostNameFor = name: "workspace-${name}";
  incusInstanceFor = name: "workspace-${name}";
  tapFor = name: "vm-${name}";

  # Host directories shared into a workspace, the same for every backend.
  # `tag` names the share (virtiofs tag, Incus device name).
  sharesFor =
    cfg: name:
    let
      state = "${cfg.stateDir}/${name}";
      home = "/home/${cfg.user.name}";
    in
    [
      {
        tag = "workspace";
        source = "${state}/workspace";
        target = "${home}/workspace";
        readOnly = false;
      }
      {
        # Read-only: the agent must not replace the key the server pinned.
        tag = "ssh-host-keys";
        source = "${state}/ssh-host-keys";
        target = "/etc/ssh-host-keys";
        readOnly = true;
      }
      {
        tag = "claude-config";
        source = "${state}/claude-config";
        target = "${home}/claude-config";
        readOnly = false;
      }
    ]
    ++ lib.optional (cfg.binaryCache.netrcFile != null) {
      tag = "secrets";
      source = "/run/sandboxed-workspace/${name}";
      target = "/var/lib/sandbox-secrets";
      readOnly = true;
    };
}
