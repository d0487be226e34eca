"""Server processes: the SGLang launch command built from configuration (``launcher``), one server
subprocess started, health-checked and stopped by process group (``process``), what /proc says
about processes and ports (``procfs``), and restart-on-crash (``supervisor``).

Owns process lifecycles, not what the servers do: nothing here speaks the policy's or the
reward's API beyond ``/health``, and nothing imports the search, the service or the reward code.
"""
