"""Which trials a sweep runs: the whole grid in file order, or samples of the space drawn by
optuna (random, or TPE guided by the results so far) up to the trial budget.

optuna is optional (the ``sweep`` extra) and imported only for random / TPE. Each space key is a
categorical parameter over the indices of its values (values may be lists or mappings, which
optuna's categorical choices cannot hold), and the model is one more when there are several.
A sample that repeats an earlier trial is not run again: optuna is told the earlier result (or
that the sample was pruned while it is still running) and asked for another; the sweep ends
early when many samples in a row only repeat (the space is exhausted).

The objective optuna maximises is ``-p50_ms * (1 + gate_miss)`` (see ``results.gate_miss``): the
fastest trial that meets the gates scores highest, and a trial that misses them is pushed down
in proportion to how far it misses.
"""

from __future__ import annotations

from typing import Any

from deployopt.core.errors import UserError
from deployopt.sweeps.spec import SweepSpec, Trial

_REPEATS_BEFORE_STOP = 50


def require_optuna():
    try:
        import optuna
    except ImportError as e:
        raise UserError("search.strategy random/tpe needs optuna, which is not installed: "
                        "pip install 'deployopt[sweep]'") from e
    return optuna


class Proposer:
    """``ask()`` the next trial (None when done), ``tell(trial, value)`` its objective (None: failed)."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.count = 0
        strategy = spec.search.strategy
        self.budget = min(spec.search.trials or spec.size(), spec.size())
        self._grid = spec.grid() if strategy == "grid" else None
        self._study = None
        self._seen: dict[tuple, tuple[Trial, Any]] = {}  # combination -> (trial, its optuna trial)
        self._values: dict[int, float | None] = {}
        self._pending: dict[int, Any] = {}  # trial index -> optuna trial awaiting its value
        if self._grid is None:
            optuna = require_optuna()
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            seed = spec.search.seed
            sampler = (optuna.samplers.RandomSampler(seed=seed) if strategy == "random" else
                       optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, self.budget // 3))))
            self._study = optuna.create_study(direction="maximize", sampler=sampler)

    def _trial(self, model: int, settings: dict[str, Any]) -> Trial:
        trial = Trial(self.count, self.spec.models[model], self.spec.labels[model], settings)
        self.count += 1
        return trial

    def ask(self) -> Trial | None:
        if self.count >= self.budget:
            return None
        if self._grid is not None:
            model, settings = self._grid[self.count]
            return self._trial(model, settings)
        from optuna.trial import TrialState

        for _ in range(_REPEATS_BEFORE_STOP):
            sample = self._study.ask()
            model = (sample.suggest_categorical("model", list(range(len(self.spec.models))))
                     if len(self.spec.models) > 1 else 0)
            picks = {key: sample.suggest_categorical(key, list(range(len(values))))
                     for key, values in self.spec.space.items()}
            combination = (model, *picks.values())
            if combination in self._seen:
                earlier = self._seen[combination][0]
                value = self._values.get(earlier.index)
                if value is None:
                    self._study.tell(sample, state=TrialState.PRUNED if earlier.index not in self._values
                                     else TrialState.FAIL)
                else:
                    self._study.tell(sample, value)
                continue
            trial = self._trial(model, {key: self.spec.space[key][i] for key, i in picks.items()})
            self._seen[combination] = (trial, sample)
            self._pending[trial.index] = sample
            return trial
        return None  # only repeats: the space is exhausted

    def tell(self, trial: Trial, value: float | None) -> None:
        self._values[trial.index] = value
        sample = self._pending.pop(trial.index, None)
        if sample is None:
            return
        from optuna.trial import TrialState

        if value is None:
            self._study.tell(sample, state=TrialState.FAIL)
        else:
            self._study.tell(sample, value)
