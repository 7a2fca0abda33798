"""``optimizer search``: a study over the recipe's ``search:`` section, each trial a recipe run by the Runner.

- ``space``: the ``search:`` schema, its checks against the recipe, and a trial's parameters turned into a recipe;
- ``study``: the Optuna study (journal file, seeded sampler, budgets as constraints);
- ``trial``: one trial run through the Runner, its outcome read from the run's report;
- ``executor``: where trials run (a local process pool, or Ray tasks);
- ``driver``: the search loop (screening, full re-measure of the Pareto set, the choice, publishing);
- ``report``: the search report (JSON, Markdown, HTML).

This package imports no heavy library at module level: the recipe schema imports ``space``.
"""
