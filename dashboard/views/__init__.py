"""The dashboard's views, one module each, every one a `render(source)` that reads through dashboard.data only."""

from . import detail, longstream, retrieval, runs, settings, speculation, spikes, sql, sweeps, tradeoff

VIEWS = {
    "Runs": runs.render,
    "Settings": settings.render,
    "Trade-off": tradeoff.render,
    "Sweeps": sweeps.render,
    "Run detail": detail.render,
    "Compaction spikes": spikes.render,
    "Long stream": longstream.render,
    "Speculation": speculation.render,
    "Retrieval": retrieval.render,
    "SQL": sql.render,
}
