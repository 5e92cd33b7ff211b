r"""An accounted hyperparameter search: a random number of private runs, the best one released, ε for all of it.

:class:`PrivateSearch` draws the number of runs K from a declared distribution and K configurations from the search
space (uniformly, key by key) with a :mod:`lightning_dp.randomness` source (secure mode included; never a global
RNG), trains each with :class:`~lightning_dp.DPStrategy`, scores it, and releases only the best run: its model,
configuration and score, with ε of the whole search (:func:`~lightning_dp.tuning.accounting.search_epsilon`, the
Papernot–Steinke bound). Either σ is calibrated per run so that the *search* meets ``target_epsilon``, or a fixed
``noise_multiplier`` is used and the resulting total ε reported.

Selection (``selection=``):

- ``"private"``: the score is computed on a private validation split, then released with Gaussian noise of std
  ``score_noise_multiplier`` × sensitivity. The score must be a mean over the validation set of per-example values
  in [0, 1] (accuracy): sensitivity 1/n_val. Each run then composes its DP-SGD steps with one Gaussian release
  ``(score_noise_multiplier, 1.0, 1)``, and both are charged.
- ``"public"``: the score is computed on a public split, without noise. This drops the score's own charge only:
  each run still trains on private data and the choice of the best depends on every run's model, so the
  Papernot–Steinke charge for the selection remains (a *fixed* number of runs with a public choice can leak as much
  as their composition). Only tuning that trains on public data alone is free; see the docs page "Tuning under DP".

A crashed search resumes from the state file ``search_state.json`` in ``directory`` (written atomically after each
run: the drawn count and configurations, the finished runs, the best checkpoint): the count is not redrawn and
finished runs are not retrained.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger

from lightning_dp.console import notice, warn
from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.randomness import RandomSource, SecureSource, TorchSource, derive_seed, fresh_seed
from lightning_dp.strategy import DPStrategy
from lightning_dp.tuning.accounting import calibrate_search_noise, run_rdp, search_epsilon_of_plans
from lightning_dp.tuning.distributions import PoissonRuns, RunsDistribution, TruncatedNegativeBinomialRuns
from lightning_dp.tuning.report import RunResult, SearchResult, plot_scores, write_table

STATE_FILE = "search_state.json"
_STATE_VERSION = 1
#: Keys of a configuration that the search itself reads (the rest only reach the factories).
BATCH_SIZE, EPOCHS, CLIP = "batch_size", "epochs", "max_grad_norm"


class SearchSources:
    """The random sources of one search: the count, the configurations and each run's score noise.

    Args:
        secure: draw from the cryptographically secure generator (:class:`~lightning_dp.randomness.SecureSource`).
        seed: a fixed root (for reproducible tests only: the guarantee then rests on it staying secret).

    Raises:
        DPMisconfigurationError: for a seed together with ``secure``, or a negative seed.
    """

    def __init__(self, secure: bool = False, seed: int | None = None) -> None:
        if seed is not None and (secure or not isinstance(seed, int) or seed < 0):
            raise DPMisconfigurationError(
                "A search seed must be a non-negative int, and secure_mode=True takes none (it draws from the OS's"
                " secure generator); remove the seed or turn secure mode off for reproducible tests."
            )
        if seed is not None:
            warn(
                "lightning_dp: the search's seed is fixed: the number of runs, the configurations and the score noise"
                " can be rebuilt by anyone who knows it. Use it for reproducible tests only."
            )
        self.secure = secure
        self._root = seed if seed is not None else fresh_seed()
        self._key = secrets.token_bytes(32) if secure else b""

    def source(self, purpose: str, index: int = 0) -> RandomSource:
        """An independent source for ``purpose`` (``"count"``, ``"configs"``, ``"score"``) and run ``index``."""
        if self.secure:
            return SecureSource(hashlib.blake2b(self._key + repr((purpose, index)).encode(), digest_size=32).digest())
        return TorchSource(derive_seed(self._root, "search", purpose, int(index)))


def draw_search(
    runs: RunsDistribution, space: Mapping[str, Sequence[Any]], sources: SearchSources
) -> list[dict[str, Any]]:
    """Draw K ~ ``runs`` and K configurations, each key's value uniformly from its choices.

    Args:
        runs: the distribution of the number of runs.
        space: key → the values to choose from.
        sources: where the random numbers come from.

    Returns:
        The K configurations (possibly none).
    """
    count = runs.sample(sources.source("count"))
    keys = sorted(space)
    uniforms = sources.source("configs").uniform(count * len(keys)).reshape(count, len(keys))
    return [
        {k: space[k][min(int(u * len(space[k])), len(space[k]) - 1)] for k, u in zip(keys, row.tolist())}
        for row in uniforms
    ]


class PrivateSearch:
    """A search over hyperparameters whose released result carries one ε for the whole search.

    Args:
        model_factory: ``config -> LightningModule`` (the learning rate, layer-selection preset, ... of ``config``).
        data_factory: ``config -> (train_loader, validation_loader)``; the train loader must use
            ``config["batch_size"]`` over the ``num_samples`` private examples. The validation loader is the private
            validation split (``selection="private"``) or a public split (``"public"``).
        space: key → values; keys ``batch_size``, ``epochs``, ``max_grad_norm`` are read by the search (with
            ``defaults``), every key reaches the factories.
        num_samples: N, the private training set's size (plans are q = B/N, T = epochs·⌈N/B⌉).
        runs: :class:`~lightning_dp.tuning.PoissonRuns`, ``GeometricRuns`` or ``TruncatedNegativeBinomialRuns``.
        delta: δ of the whole search.
        target_epsilon: ε of the whole search: σ is calibrated per plan to meet it. Exclusive with
            ``noise_multiplier``.
        noise_multiplier: a fixed σ for every run; the total ε is reported.
        score: the metric logged by ``validation_step`` that selects the best run.
        mode: ``"max"`` or ``"min"`` of the score.
        selection: ``"private"`` or ``"public"`` (see the module docstring).
        score_noise_multiplier: for a private selection, the score's noise std over its sensitivity.
        score_sensitivity: the score's sensitivity; default 1/n_val (a mean of values in [0, 1]).
        directory: where the state file, the best checkpoint, the logs, the table and the plot go.
        defaults: values of ``batch_size``/``epochs``/``max_grad_norm`` (and any key) not in ``space``.
        callbacks_factory: ``config -> [callbacks]`` (e.g. ``LinearProbeThenFineTune``, ``SparseFineTuning``).
        logger_factory: ``(config, index, group) -> Logger``; default a ``CSVLogger`` named ``group``, version
            ``run_<index>`` (for W&B: ``WandbLogger(group=group, name=f"run-{index}")``).
        trainer_kwargs: further ``L.Trainer`` arguments; ``strategy_kwargs``: further ``DPStrategy`` arguments.
        secure_mode: draw the count, configurations and score noise, and every run's noise, securely.
        seed: fix the search's own draws (tests only).

    Example:
        >>> search = PrivateSearch(make_model, make_data, {"max_grad_norm": [0.5, 1.0], "batch_size": [64, 256]},
        ...                        num_samples=25_000, runs=GeometricRuns(8), delta=1e-5, target_epsilon=8.0,
        ...                        directory="search")  # doctest: +SKIP
        >>> result = search.run()  # doctest: +SKIP
        >>> result.epsilon, result.config, result.score  # doctest: +SKIP
    """

    def __init__(
        self,
        model_factory: Callable[[dict[str, Any]], L.LightningModule],
        data_factory: Callable[[dict[str, Any]], tuple[Any, Any]],
        space: Mapping[str, Sequence[Any]],
        *,
        num_samples: int,
        runs: RunsDistribution,
        delta: float,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        score: str = "val_acc",
        mode: Literal["max", "min"] = "max",
        selection: Literal["private", "public"] = "private",
        score_noise_multiplier: float = 10.0,
        score_sensitivity: float | None = None,
        directory: str | Path = "dp_search",
        defaults: Mapping[str, Any] | None = None,
        callbacks_factory: Callable[[dict[str, Any]], list[Any]] | None = None,
        logger_factory: Callable[[dict[str, Any], int, str], Logger | bool] | None = None,
        trainer_kwargs: Mapping[str, Any] | None = None,
        strategy_kwargs: Mapping[str, Any] | None = None,
        secure_mode: bool = False,
        seed: int | None = None,
    ) -> None:
        if (target_epsilon is None) == (noise_multiplier is None):
            raise DPMisconfigurationError(
                "Give exactly one of target_epsilon (of the whole search) and noise_multiplier (of every run)."
            )
        if not isinstance(runs, (PoissonRuns, TruncatedNegativeBinomialRuns)):
            raise DPMisconfigurationError(
                f"runs must be PoissonRuns, GeometricRuns or TruncatedNegativeBinomialRuns, got {runs!r}: a fixed"
                " number of runs with the best released is not covered by the Papernot–Steinke bound."
            )
        if selection not in ("private", "public") or mode not in ("max", "min"):
            raise DPMisconfigurationError("selection must be 'private' or 'public' and mode 'max' or 'min'.")
        if not space or any(len(v) == 0 for v in space.values()):
            raise DPMisconfigurationError("The search space needs at least one key, each with at least one value.")
        if selection == "private" and not score_noise_multiplier > 0:
            raise DPMisconfigurationError("A private selection needs score_noise_multiplier > 0 (the score is noised).")
        self.space = {k: list(v) for k, v in space.items()}
        self.defaults = dict(defaults or {})
        try:
            json.dumps([self.space, self.defaults])
        except TypeError as err:
            raise DPMisconfigurationError(
                "Search-space values and defaults must be plain JSON values (numbers, strings, booleans, lists): the"
                " state file that lets a crashed search resume holds them."
            ) from err
        for key in (BATCH_SIZE, EPOCHS):
            if key not in self.space and key not in self.defaults:
                raise DPMisconfigurationError(f"Give '{key}' in the space or in defaults: the plan (q, T) needs it.")
        self.model_factory, self.data_factory = model_factory, data_factory
        self.num_samples, self.runs, self.delta = int(num_samples), runs, float(delta)
        self.target_epsilon, self.fixed_sigma = target_epsilon, noise_multiplier
        self.score, self.mode, self.selection = score, mode, selection
        self.score_noise_multiplier, self.score_sensitivity = float(score_noise_multiplier), score_sensitivity
        self.directory = Path(directory)
        self.callbacks_factory, self.logger_factory = callbacks_factory, logger_factory
        self.trainer_kwargs, self.strategy_kwargs = dict(trainer_kwargs or {}), dict(strategy_kwargs or {})
        self.secure_mode, self.seed = secure_mode, seed
        self.group = self.directory.resolve().name

    # ------------------------------------------------------------------------------------------------ plans
    def full_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """``defaults`` updated with ``config``."""
        return {**self.defaults, **config}

    def plan_of(self, config: Mapping[str, Any]) -> tuple[float, int]:
        """(q, T) of a configuration: q = B/N, T = epochs·⌈N/B⌉ (as ``DPStrategy`` plans a ``max_epochs`` run)."""
        full = self.full_config(config)
        batch, epochs = int(full[BATCH_SIZE]), int(full[EPOCHS])
        if not 1 <= batch <= self.num_samples or epochs < 1:
            raise DPMisconfigurationError(f"batch_size must be in [1, {self.num_samples}] and epochs ≥ 1; got {full}.")
        return batch / self.num_samples, epochs * math.ceil(self.num_samples / batch)

    def plans(self) -> list[tuple[float, int]]:
        """Every distinct plan the space can produce (the configurations' batch sizes × epochs)."""
        batches = self.space.get(BATCH_SIZE, [self.defaults.get(BATCH_SIZE)])
        epochs = self.space.get(EPOCHS, [self.defaults.get(EPOCHS)])
        return sorted({self.plan_of({BATCH_SIZE: b, EPOCHS: e}) for b in batches for e in epochs})

    def score_segments(self) -> list[tuple[float, float, int]]:
        """The segment each run adds for its noisy score (none for a public selection)."""
        return [(self.score_noise_multiplier, 1.0, 1)] if self.selection == "private" else []

    def sigmas(self) -> dict[tuple[float, int], float]:
        """σ per plan: calibrated so that the search meets ``target_epsilon``, or the fixed σ."""
        plans = self.plans()
        if self.fixed_sigma is not None:
            return dict.fromkeys(plans, float(self.fixed_sigma))
        sig = calibrate_search_noise(self.target_epsilon, self.delta, self.runs, plans, self.score_segments())
        return dict(zip(plans, sig))

    def epsilon(self, sigmas: Mapping[tuple[float, int], float]) -> float:
        """ε of the whole search: :func:`search_epsilon_of_plans` over every plan of the space."""
        plans = [[(sigmas[(q, t)], q, t), *self.score_segments()] for q, t in sigmas]
        return search_epsilon_of_plans(plans, self.delta, self.runs)

    # ------------------------------------------------------------------------------------------------ state
    def _declaration(self) -> dict[str, Any]:
        return {
            "space": self.space, "defaults": self.defaults, "num_samples": self.num_samples,
            "runs": [type(self.runs).__name__, self.runs.mean, self.runs.shape], "delta": self.delta,
            "target_epsilon": self.target_epsilon, "noise_multiplier": self.fixed_sigma, "selection": self.selection,
            "score": self.score, "mode": self.mode, "score_noise_multiplier": self.score_noise_multiplier,
        }  # fmt: skip

    def _load_or_draw(self, sources: SearchSources) -> dict[str, Any]:
        path = self.directory / STATE_FILE
        declared = json.loads(json.dumps(self._declaration()))
        if path.exists():
            state = json.loads(path.read_text())
            if state.get("version") != _STATE_VERSION or state["declaration"] != declared:
                raise DPMisconfigurationError(
                    f"{path} belongs to a search declared differently ({state.get('declaration')}); a search cannot"
                    " change its space, distribution, target or selection when it resumes. Use a new directory."
                )
            notice(
                f"lightning_dp: resuming the search in {self.directory}: {len(state['results'])} of"
                f" {state['runs_drawn']} runs done (the count is not redrawn)."
            )
            return state
        configs = draw_search(self.runs, self.space, sources)
        state = {"version": _STATE_VERSION, "declaration": declared, "runs_drawn": len(configs), "configs": configs,
                 "results": [], "best": None}  # fmt: skip
        self._save(state)
        return state

    def _save(self, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.directory / STATE_FILE)

    # ------------------------------------------------------------------------------------------------ runs
    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.mode == "max" else a < b)

    def _train(self, index: int, config: dict[str, Any], sigma: float, sources: SearchSources) -> tuple[Any, RunResult]:
        full = self.full_config(config)
        q, steps = self.plan_of(config)
        start = time.process_time()
        model = self.model_factory(full)
        train_loader, val_loader = self.data_factory(full)
        strategy = DPStrategy(noise_multiplier=sigma, target_delta=self.delta,
                              max_grad_norm=float(full.get(CLIP, 1.0)), secure_mode=self.secure_mode,
                              **self.strategy_kwargs)  # fmt: skip
        logger = (
            self.logger_factory(full, index, self.group)
            if self.logger_factory
            else CSVLogger(save_dir=str(self.directory / "logs"), name=self.group, version=f"run_{index}")
        )
        if isinstance(logger, Logger):
            logger.log_hyperparams({**full, "search_group": self.group, "search_run": index})
        kwargs = {"accelerator": "cpu", "enable_checkpointing": False, "enable_progress_bar": False,
                  "enable_model_summary": False, **self.trainer_kwargs}  # fmt: skip
        callbacks = list(self.callbacks_factory(full)) if self.callbacks_factory else []
        trainer = L.Trainer(max_epochs=int(full[EPOCHS]), strategy=strategy, logger=logger, callbacks=callbacks,
                            default_root_dir=str(self.directory), **kwargs)  # fmt: skip
        trainer.fit(model, train_loader)
        self._check_spent(strategy, sigma, q, steps, full)
        metrics = trainer.validate(model, val_loader, verbose=False)[0]
        if self.score not in metrics:
            raise DPMisconfigurationError(
                f"validation_step did not log '{self.score}' (logged: {sorted(metrics)}): log the selection score."
            )
        value = float(metrics[self.score])
        if self.selection == "private":
            n_val = len(val_loader.dataset)
            sensitivity = self.score_sensitivity if self.score_sensitivity is not None else 1.0 / n_val
            noise = sources.source("score", index).normal((1,), self.score_noise_multiplier * sensitivity,
                                                          torch.device("cpu"), torch.float64)  # fmt: skip
            value += float(noise[0])
        if isinstance(logger, Logger):
            logger.log_metrics({"search/score": value}, step=trainer.global_step)
            logger.finalize("success")
        result = RunResult(index, dict(config), value, sigma, q, strategy.ledger.steps, time.process_time() - start)
        return model, result

    def _check_spent(self, strategy: DPStrategy, sigma: float, q: float, steps: int, config: dict[str, Any]) -> None:
        """The run's ledger must not exceed its plan at any Rényi order (the search's ε is computed from the plan)."""
        spent, planned = run_rdp(strategy.ledger.segments), run_rdp([(sigma, q, steps)])
        if np.any(spent > planned * (1 + 1e-9) + 1e-12):
            raise DPMisconfigurationError(
                f"A run spent more than its plan (σ={sigma:.4g}, q={q:.4g}, T={steps}): its ledger is"
                f" {strategy.ledger!r}. The train loader must use batch_size=config['batch_size'] over"
                f" num_samples={self.num_samples} examples, with max_epochs=config['epochs'], and callbacks must not"
                f" release further noisy statistics (config {config})."
            )

    def run(self) -> SearchResult:
        """Run (or resume) the search and release its best run.

        Returns:
            A :class:`~lightning_dp.tuning.report.SearchResult`: the best model, configuration, score and the ε of
            the whole search; ``released=False`` when no run was drawn.

        Raises:
            PrivacyTargetError: if the target cannot be met; DPMisconfigurationError: for a state file of another
                search, or a run that spent more than its plan.
        """
        sigmas = self.sigmas()
        epsilon = self.epsilon(sigmas)
        sources = SearchSources(self.secure_mode, self.seed)
        state = self._load_or_draw(sources)
        notice(
            f"lightning_dp: search of {state['runs_drawn']} runs drawn from {self.runs!r}; ε = {epsilon:.4g} at"
            f" δ = {self.delta:g} for the whole search ({self.selection} selection)."
        )
        results = [RunResult(**r) for r in state["results"]]
        best_model = None
        for index in range(len(results), state["runs_drawn"]):
            config = state["configs"][index]
            model, result = self._train(index, config, sigmas[self.plan_of(config)], sources)
            results.append(result)
            state["results"].append(vars(result))
            if self._better(result.score, None if state["best"] is None else state["best"]["score"]):
                path = self.directory / "best_model.pt"
                torch.save(model.state_dict(), path.with_suffix(".tmp"))
                os.replace(path.with_suffix(".tmp"), path)
                state["best"] = {"index": index, "score": result.score, "checkpoint": str(path)}
                best_model = model
            self._save(state)
        return self._release(state, results, best_model, epsilon)

    def _release(self, state: dict[str, Any], results: list[RunResult], model: Any, epsilon: float) -> SearchResult:
        best = state["best"]
        out = SearchResult(released=best is not None, config=None, score=None, epsilon=epsilon, delta=self.delta,
                           selection=self.selection, runs_drawn=state["runs_drawn"], runs=results)  # fmt: skip
        if results:
            out.table, out.markdown = self.directory / "results.csv", self.directory / "results.md"
            write_table(results, best and best["index"], out.table, out.markdown)
            out.plot = plot_scores(results, best and best["index"], self.directory / "scores.png",
                                   f"{self.group}: {len(results)} runs, ε = {epsilon:.3g} (whole search)")  # fmt: skip
        if best is not None:
            out.config = self.full_config(state["configs"][best["index"]])
            out.score, out.checkpoint = best["score"], Path(best["checkpoint"])
            if model is None:  # resumed after the best run: rebuild it from its checkpoint
                model = self.model_factory(out.config)
                model.load_state_dict(torch.load(out.checkpoint, weights_only=True))
            out.model = model
        notice(f"lightning_dp: {out.summary()}")
        return out


__all__ = ["PrivateSearch", "SearchSources", "draw_search"]
