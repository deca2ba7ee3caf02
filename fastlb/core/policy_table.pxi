# POLICIES (name -> class) is the one table; make_policy() builds from it. Options:
#   round_robin  max_fails            nginx's max_fails: a failure lowers the effective weight
#                                     by weight // max_fails (1..MAX_FAILS, default 1)
#   maglev       hash_balance_factor  HAProxy's hash-balance-factor, a percent: a backend takes
#                                     a new key only while its active count stays within that
#                                     % of its weighted share (0 = off, else 100..MAX_BALANCE_FACTOR);
#                                     needs counters
#                table_size           a prime > 100 x backends (default 65537 or above)
# Included after every policy file: the table names their classes.

# The one name -> class table (config's policy names, make_policy, the stub).
POLICIES = {cls.NAME: cls for cls in (RoundRobin, WeightedRandom, LeastConn, Maglev)}


def make_policy(str name, slots, weights, health, *, counters=None, ids=None, uint64_t seed=0,
                options=None):
    """Build the policy called ``name`` (a key of POLICIES). Every policy takes the same
    arguments and uses what it needs: ``counters`` (least_conn; maglev with a balance factor),
    ``ids`` (maglev: the stable backend ids its table is built from), ``seed`` (random,
    least_conn), ``options`` (a dict of the policy's own options, see POLICIES[name].OPTIONS)."""
    cls = POLICIES.get(name)
    if cls is None:
        raise CoreArgumentError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}")
    return cls(slots, weights, health, counters=counters, ids=ids, seed=seed, options=options)
