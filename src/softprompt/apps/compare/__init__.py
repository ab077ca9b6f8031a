"""Hard prompts vs soft prompts on one task: every method, same splits, same scorer.

``run_compare`` turns a :class:`CompareConfig` into a *plan* of runs, executes the ones
not already finished, and writes ``results.json`` after every run (atomically), so a
crash loses at most the run in progress and calling it again skips finished runs
(a run is finished when ``results.json`` holds a record with the same *spec*: template,
data fingerprints, budgets, seed, model).  ``apps.report.write_report`` then renders
``report.md``, ``report.html`` and the plots from ``results.json`` alone.

The package, in the order its imports go::

    config       CompareConfig, method names, Run / Row, data fingerprints
    templates    the templates a comparison builds (lengths, hybrids, transfer, few-shot answers)
    decision_stats  metrics on weighted examples, paired bootstrap, McNemar, the selection rule
    decision_checks majority floor, stability over resampled validation, break-even, latency limit
    decision     choosing on validation; the recommendation and its checks
    variants     one prompt scored under every calibration on validation and test
    measure      latency per query, the one-line run summary
    planners     the registry: one ``@planner("method")`` per method; ``plan()`` runs them in order
    hard_runs    planners and executors of the searched-instruction, nearest-neighbour and CoT runs
    soft_training  how a soft run trains: the recipe (learning rate chosen on validation), or --restarts
    estimate     this machine's measured speed; seconds per planned run from its data sizes
    budget       --budget: what fits (core first, then the rest), the printed plan, estimated vs actual
    runner       Comparison: data, persistence in results.json, execution of every run
    decision_report  the report's decision and calibration sections

**Adding a method**: its name in ``config.ALL_METHODS`` and ``config.PLAN_ORDER``, one
``@planner`` function (``planners.py``), and for a new kind of run one ``@executor`` (and a cost
model in ``estimate.KINDS``; without one its estimate comes from ``Run.cost``), and its place in
``budget.CORE`` or ``budget.EXTRAS``.

Methods (``--methods``), all scored by ``scoring.classify`` on the SAME test sample:

==============  ==========================================================================
zero_shot       the task instruction + hard template (``baselines.zero_shot_template``); for a
                model with a chat template in its format (``chat.py``) and plain as a 2nd row
few_shot        k demonstrations, class-balanced or random, several sampling seeds x
                several orders (reported as mean +/- std and min..max)
knn             few-shot with each input's k nearest training examples (``demo_selection``)
search          the best instruction found on the training pool (``instruction_search``)
cot             two-stage chain-of-thought: reasoning, then the labels ranked after it
                (``baselines.cot_two_stage``); the free-text parse is a diagnostic
soft            prompt tuning with the task template, ``prompt_length`` tokens,
                ``init``, one run per seed in ``seeds``, each trained by the recipe
                (``search.train_with_recipe``): its learning rate chosen on validation
                data by successive halving; ``lrs`` given: one row per rate of that grid
length          prompt tuning at each of ``lengths`` (seeds ``sweep_seeds``)
init            prompt tuning with each of ``inits``
hybrid          instruction text + soft tokens at each of ``positions``: ``prefix``
                (before the instruction), ``between`` (right after the first input field:
                between fields for multi-field tasks), ``answer`` (right before the answer)
ensemble        the ``soft`` prompts (one per seed) as an ensemble, one batched pass,
                mean-probability and majority-vote rows
curve           data efficiency: prompt tuning on ``train_sizes`` labelled examples
                (class-balanced subsets), ``0`` meaning all
transfer        the ``soft`` prompts scored on ``eval_task`` (same labels, or mapped with
                ``eval_label_map``), next to a zero-shot reference on that task
ptuning         P-tuning: the ``soft`` template's ``prompt_length`` tokens trained through a
                prompt encoder (``ptuning_encoder``: lstm | mlp, width 128) at ``encoder_lr``,
                one run per seed in ``seeds`` (opt-in: not in ``DEFAULT_METHODS``)
prefix          prefix tuning: ``prompt_length`` learned key/value positions at every layer,
                on the task template without its soft slots; directly at ``lr``
                (default the recipe's)
                (``prefix_reparam`` none) or through an MLP at ``encoder_lr`` (mlp); one run
                per seed in ``seeds`` (opt-in; not for encoder-decoder models)
==============  ==========================================================================

**Choosing** (issue 14; ``decision``).  Every classification prompt is scored under each
of ``calibrations`` on validation and test (``variants``); validation is the task's split or,
without one, a stratified ``valid_fraction`` of the training pool (``splits.py``).  Hard runs
go first; the hard prompt best on validation (``select_metric``, default macro-F1) is where
soft prompts start (``start_from_hard``: its instruction as text init and hybrid text).  At the
end ``results["decision"]`` holds each family's prompt chosen on validation, their paired
bootstrap interval and McNemar test on the test set, and the recommendation.  Issue 23 checks
it (``decision_checks``): neither prompt is recommended when neither beats always answering the
majority label on validation (``floor``); ``stability`` reruns the whole choice on 200
resamples of the validation examples; ``break_even`` is the query count after which the soft
prompt's training is paid back by faster queries; ``max_latency_ms`` rules out slow candidates.

``DEFAULT_METHODS`` (what the CLI's ``--methods all`` means) is every method except
``ptuning`` and ``prefix``: each adds one training per seed, and a default comparison
rerun over an old ``results.json`` should not start training new prompts.  A
P-tuning run's ``trainable_params`` counts the encoder network it trains (its saved prompt,
the network's output, is ``artifact_params``); a prefix run's counts the key/values, and its
``tokens_added`` includes the prefix positions, which each query attends to as it does to
cached soft tokens.

**Generation tasks** (question answering, e.g. HotpotQA) run the methods that make sense
for free text: ``zero_shot``, ``few_shot`` (demonstrations end with their gold answer and
are drawn at random; from the data's ``demonstrations`` split when it has one, e.g. the
training questions with shortened contexts), ``soft``, ``length``, ``init`` (not
``labels``, which needs label words), ``hybrid``, ``curve``, ``ptuning`` and ``prefix``.  Answers are generated
greedily (``max_new_tokens``, stopping at a newline) by ``scoring.generate`` and scored by
SQuAD exact match and token F1 against every gold answer; chain-of-thought, ensembles and
transfer are classification-only and are skipped with a message.

Every run records accuracy, macro-F1 (and the confusion matrix) or exact match and F1, trainable parameters,
artifact bytes (the ``.safetensors`` file for soft prompts; the UTF-8 template text for
hard prompts), tokens added to each query (``baselines.template_overhead_tokens``; for
chain-of-thought plus the mean number of generated tokens), latency per query at batch 1
and batched (measured on ``latency_examples`` test examples after a warm-up, with each
prompt's prefix key/values cached as when serving), training wall time and the loss
history.
"""

from __future__ import annotations

from ...core.calibration import CALIBRATIONS
from .config import (
    ALL_METHODS,
    CLASSIFICATION_ONLY,
    DEFAULT_METHODS,
    FAMILY_EN,
    FAMILY_HY,
    FAMILY_PE,
    FAMILY_PT,
    FAMILY_TR,
    PLAN_ORDER,
    POSITIONS,
    RESULTS,
    CompareConfig,
    Row,
    Run,
    _sample,  # noqa: F401 -- compare._sample: the tests draw the runner's samples
    fingerprint,
)
from .runner import Comparison, run_compare
from .templates import few_shot_answer_template, hybrid_template, transfer_template, with_soft_length

__all__ = [
    "ALL_METHODS",
    "CALIBRATIONS",
    "CLASSIFICATION_ONLY",
    "DEFAULT_METHODS",
    "FAMILY_EN",
    "FAMILY_HY",
    "FAMILY_PE",
    "FAMILY_PT",
    "FAMILY_TR",
    "PLAN_ORDER",
    "POSITIONS",
    "RESULTS",
    "CompareConfig",
    "Comparison",
    "Row",
    "Run",
    "few_shot_answer_template",
    "fingerprint",
    "hybrid_template",
    "run_compare",
    "transfer_template",
    "with_soft_length",
]
