"""The coordinating server as a Flower ServerApp: a training run (`server.training_run`) or, when
the run config carries a cohort query, a query (`server.analytics`)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from federation.config import RunConfig
from federation.errors import FedriskError
from server.training_run import FederatedResult, Progress, run_federated

__all__ = ["FederatedResult", "Progress", "make_server_app", "run_federated", "app"]


def make_server_app(preset: RunConfig | None = None, progress: Progress | None = None,
                    outcome: list | None = None, in_flight: int | None = None) -> ServerApp:
    """A ServerApp: federated training, or a cohort query when the run config carries one.
    `preset` fixes the run config (simulation); `outcome` receives the FederatedResult (or
    `server.analytics.QueryResult`), or the user-caused error that ended the run; `in_flight`
    caps a training step's unanswered messages (simulation: its workers answer a few at a time)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            config = preset or RunConfig.from_user_config(context.run_config)
            if config.query:
                from server.analytics import run_analytics

                result = run_analytics(grid, config)
            else:
                result = run_federated(grid, config, progress, share_config=preset is None, in_flight=in_flight)
        except FedriskError as exc:
            if outcome is None:
                raise
            outcome.append(exc)
            return
        if outcome is not None:
            outcome.append(result)

    return server_app


app = make_server_app()
