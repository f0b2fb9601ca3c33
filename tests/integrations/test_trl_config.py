"""PromaGRPOConfig's proma_* fields: checked when the config is built (also through TrlParser), errors naming
the field; the gradient_accumulation_steps=1 warning; options that do not fit the model fail at trainer
construction; an empty completion's weight. No training here: each test builds a config or a trainer."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("trl")

from proma.integrations.trl import PromaGRPOConfig, PromaGRPOTrainer, sequence_weights  # noqa: E402
from proma.options import ACCUMULATOR_SOLVERS, INTRA_FORMS, STRATEGIES, SYNCS, VARIANTS  # noqa: E402
from verification.trl_testkit import config, dataset, length_reward  # noqa: E402

# (field, mistyped value, what the error must show besides the field name)
TYPOS = [
    ("proma_variant", "promaa", str(VARIANTS)),
    ("proma_solver", "exactt", str(ACCUMULATOR_SOLVERS)),
    ("proma_sync", "globl", str(SYNCS)),
    ("proma_intra_form", "kronn", str(INTRA_FORMS)),
    ("proma_strategy", "ghosts", str(STRATEGIES)),
    ("proma_passes", 0, "int >= 1"),
    ("proma_intra_rank", -1, "int >= 0"),
    ("proma_ridge", 0.0, "float > 0"),
    ("proma_relative_bound", -0.5, "float >= 0"),
    ("proma_shrinkage", float("nan"), "finite"),
    ("proma_exclude", [3], "parameter names"),
    ("proma_max_transient", 0, "int >= 1"),
]


def test_every_accumulator_option_is_a_config_field():
    """The option list is read from AccumulatorOptions (it once missed max_transient)."""
    import dataclasses

    from proma.integrations.trl import ACCUMULATOR_OPTIONS
    from proma.options import AccumulatorOptions

    names = tuple(f.name for f in dataclasses.fields(AccumulatorOptions))
    assert ACCUMULATOR_OPTIONS == names and "max_transient" in names
    fields = {f.name for f in dataclasses.fields(PromaGRPOConfig)}
    assert {f"proma_{n}" for n in names} <= fields


def _trainer(policy, tokenizer, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PromaGRPOTrainer(model=copy.deepcopy(policy), reward_funcs=length_reward, train_dataset=dataset(),
                                args=args, processing_class=tokenizer)


@pytest.mark.parametrize("name,value,allowed", TYPOS, ids=[t[0] for t in TYPOS])
def test_a_mistyped_field_fails_when_the_config_is_built(name, value, allowed, tmp_path):
    with pytest.raises(ValueError) as err:
        config(PromaGRPOConfig, tmp_path, **{name: value})
    assert f"{name}=" in str(err.value) and allowed in str(err.value), str(err.value)


def test_options_that_do_not_go_together_name_both_fields(tmp_path):
    with pytest.raises(ValueError, match=r"proma_variant.*proma_sync|proma_sync.*proma_variant"):
        config(PromaGRPOConfig, tmp_path, proma_variant="intra", proma_sync="global")


def test_trl_parser_fails_on_a_typo(tmp_path):
    from trl import TrlParser

    parser = TrlParser(PromaGRPOConfig)
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]
    (args,) = parser.parse_args_into_dataclasses(argv + ["--proma_solver", "gram_schmidt", "--proma_exclude", "a", "b"])
    assert args.proma_solver == "gram_schmidt" and args.proma_exclude == ["a", "b"]
    with pytest.raises(ValueError, match=r"proma_solver='exactt'.*'exact'"):
        parser.parse_args_into_dataclasses(argv + ["--proma_solver", "exactt"])


@pytest.mark.parametrize("gas,variant,warns", [(1, "proma", True), (2, "proma", False), (1, "none", False),
                                               (1, "intra", False)])
def test_single_microbatch_warning(gas, variant, warns, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config(PromaGRPOConfig, tmp_path, gradient_accumulation_steps=gas, proma_variant=variant)
    ours = [w for w in caught if "nothing to project against" in str(w.message)]
    assert len(ours) == (1 if warns else 0), [str(w.message) for w in caught]


def test_strategy_and_exclude_reach_the_accumulator(policy, tokenizer, tmp_path):
    trainer = _trainer(policy, tokenizer, config(PromaGRPOConfig, tmp_path, proma_strategy="materialize",
                                                 proma_exclude=["model.norm.weight"]))
    opts = trainer.accumulator.options
    assert opts.strategy == "materialize" and opts.exclude == frozenset({"model.norm.weight"})


def test_exclude_naming_no_parameter_fails_at_trainer_construction(policy, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"proma_exclude=\['model.nrom.weight'\].*model.nrom.weight"):
        _trainer(policy, tokenizer, config(PromaGRPOConfig, tmp_path, proma_exclude=["model.nrom.weight"]))


def test_an_empty_completion_gets_weight_zero():
    """A completion whose loss mask is all zero (TRL's mask_truncated_completions, a tool mask) scores nothing:
    its weight is 0, and the other rows' weights are their per-token coefficient."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    coef = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [-0.25, 0.0, 0.0]])
    w = sequence_weights(coef, mask)
    assert w.tolist() == [0.5, 0.0, -0.25]

