"""The dashboard's views, one module each, every one a `render(source)` that reads through dashboard.data only."""

from . import detail, longstream, runs, settings, spikes, sql, sweeps, tradeoff

VIEWS = {
    "Runs": runs.render,
    "Settings": settings.render,
    "Trade-off": tradeoff.render,
    "Sweeps": sweeps.render,
    "Run detail": detail.render,
    "Compaction spikes": spikes.render,
    "Long stream": longstream.render,
    "SQL": sql.render,
}
