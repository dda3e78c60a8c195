# The exec agent (sandbox_mcp/exec_agent.py: the standard library only) as
# bytecode of the guest's python3, which runs it as a script just the same.
# A script given as source is compiled on every start (~9 ms here, and its
# heap stays dirtier): the Debian images compile theirs the same way.
#
#   import ./exec-agent.nix { inherit pkgs; }
#
# The server starts it at sandbox_mcp/paths.py's EXEC_AGENT_PATH with
# /usr/bin/python3 (base.nix links both there), or meets the one base.nix's
# unit starts at boot. The source is this checkout's, so the guest's agent
# speaks the protocol of the server beside this module.
{
  pkgs,
  python ? pkgs.python3,
}:
pkgs.runCommand "sandbox-mcp-exec-agent"
  {
    source = pkgs.writeText "sandbox-mcp-exec-agent.py" (builtins.readFile ../../sandbox_mcp/exec_agent.py);
  }
  ''
    ${python.interpreter} -I -c 'import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)' "$source" agent.pyc
    cp agent.pyc "$out"
  ''
