"""Bad requests are clear errors; the shipped data files load and make sense."""

from __future__ import annotations

import pytest

from aidc.compress.config import TECHNIQUES, BenchConfig, check_sparsity, check_technique
from aidc.errors import AidcError, CompressError


def test_sparsity_above_one_is_a_clear_error():
    with pytest.raises(CompressError, match="between 0 and 1"):
        check_sparsity(1.5)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, "half"])
def test_sparsity_must_be_strictly_between_zero_and_one(bad):
    with pytest.raises(CompressError):
        check_sparsity(bad)


def test_unknown_technique_names_the_valid_ones():
    with pytest.raises(CompressError) as err:
        check_technique("int4-magic")
    assert "int4-magic" in str(err.value) and "int8-dynamic" in str(err.value)


def test_compress_errors_are_aidc_errors_with_usage_exit_code():
    assert issubclass(CompressError, AidcError) and CompressError.exit_code == 2


def test_config_rejects_unknown_model_technique_and_bad_threads():
    with pytest.raises(CompressError, match="unknown model"):
        BenchConfig(models=("resnet",))
    with pytest.raises(CompressError, match="unknown technique"):
        BenchConfig(techniques=("prune-everything",))
    with pytest.raises(CompressError, match="sparsity"):
        BenchConfig(sparsities=(0.5, 1.5))
    with pytest.raises(CompressError, match="threads"):
        BenchConfig(threads=0)


def test_quick_run_skips_the_slow_torchao_dynamic_path_but_full_run_keeps_it():
    assert "int8-dynamic-torchao" not in BenchConfig(quick=True).chosen_techniques()
    assert "int8-dynamic-torchao" in BenchConfig(quick=False).chosen_techniques()
    assert BenchConfig(quick=True).chosen_sparsities() == (0.5,)


def test_corpus_file_has_disjoint_tuning_and_evaluation_text():
    from aidc.compress.cases import load_corpus, tuning_sentences

    corpus = load_corpus()
    assert len(corpus["documents"]) >= 32 and len(corpus["queries"]) >= 8
    tuning = tuning_sentences(corpus, 64)
    assert len(tuning) == 64 and not set(tuning) & set(corpus["documents"])
    assert len({s.split()[1] for s in tuning}) > 3  # spread over many subjects, not the first one


def test_targets_file_names_known_models_and_techniques():
    from aidc.compress.config import MODELS
    from aidc.compress.runner import load_targets

    targets = load_targets()
    assert {t["id"] for t in targets} == {"minilm-int8-dynamic", "digits-structured-50", "digits-distill"}
    for t in targets:
        assert t["model"] in MODELS and t["technique"] in TECHNIQUES and t["checks"]
