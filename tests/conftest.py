"""Shared fixtures: the bundled real MNIST digits, the committed demo models, a quickly trained model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from backdoorlab.data import BUNDLED_MNIST, bundled_digits

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
MODELS = ROOT / "models"
MNIST_TEST = BUNDLED_MNIST["test"]
ARCHS_FILE = ROOT / "lab/backdoorlab/archs.py"  # --arch path/to/archs.py:NAME reaches the lab's architectures
BADNETS = MODELS / "mnist_badnets_3x3.pt2"  # BadNets 3x3, target 4 (models/zoo.json)
CLEAN = MODELS / "mnist_clean.pt2"

# Two xdist workers (make test: -n 2) share the 2 cores: one torch thread each; alone, two threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
# as `make test` runs the suite (OMP_NUM_THREADS=1), also when pytest is called directly: the CLI then leaves
# torch's threads as set here and prints no "threads:" note, which tests of one-line refusals would count
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bundled real MNIST: 8,000 training and 2,000 test digits in [0, 1]."""
    return bundled_digits()


@pytest.fixture(scope="session")
def small_model(digits) -> torch.nn.Module:
    """A small CNN trained for one epoch on real digits (enough to be a real, accurate classifier)."""
    from backdoorlab import mnist_cnn, train_classifier

    x, y, xt, yt = digits
    result = train_classifier(mnist_cnn, x, y, xt, yt, epochs=2, seed=0)
    assert result.accuracy > 0.8
    return result.model


@pytest.fixture(scope="session")
def attack_meta() -> dict:
    """The demo model's trigger, as recorded by scripts/make_demo_models.py."""
    import json

    return json.loads((MODELS / "zoo.json").read_text())["mnist_badnets_3x3"]["attack"]


# Test tiers (`make test-fast` runs `-m "not slow"`): a test is slow when it trains a model, runs a scan or a CLI
# command that loads a model, or uses a fixture that does. The rule is written here once, by fixture and module,
# so that a new test in a slow module or on a slow fixture is tiered without a marker of its own.
SLOW_FIXTURES = frozenset(
    {
        "small_model",
        "reference",
        "copies",
        "screened",
        "models",
        "first_run",
        "vit_folder",
        "timm_folder",
        "saved",
        "badnets_cli",
        "gtsrb_model",
        "clean_module",
    }
)
SLOW_MODULES = frozenset(
    {
        "test_scan",
        "test_filter",
        "test_fleet",
        "test_hub",
        "test_consistency",
        "test_hostile",
        "test_mechanisms",
        "test_staged",
        "test_gate",
    }
)
SLOW_TESTS = frozenset(
    {
        "test_inputs_are_protected_through_the_library",  # scans, with tiny settings
        "test_malicious_pickle_never_runs_without_the_flag",
    }
)
FAST_IN_SLOW_MODULES = frozenset(
    {
        "test_class_folders_named_after_the_labels_are_mapped_by_name",
        "test_bad_output_paths_are_refused_before_the_model_is_loaded",
        "test_the_step_summary_is_appended_to_and_other_files_keep_a_normal_mode",
        "test_sarif_points_at_files_relative_to_the_checkout_with_stable_fingerprints",
        "test_threads_follow_the_cpus_the_process_may_use",
        "test_settings_that_make_no_sense_are_refused",  # pure functions inside otherwise slow modules
        "test_log_progress_states_an_eta_at_most_every_interval",
        "test_shape_expression_grammar",
        "test_pickle_reader_sees_through_stack_tricks",
        "test_plain_name_rule",
        "test_escapes_per_sink",
        "test_no_env_secret_reaches_a_child",
        "test_exported_graph_nodes_outside_the_allowlist_are_refused",
        "test_weighted_median_is_numpys_for_equal_weights_and_counts_repeats",
        "test_references_form_a_stratified_sample_of_all_classes",
    }
)


# Detection claims on real models with default-size scans (`make test-detection`, before a release and after
# any change of the method): the bundled and trained models flagged with their targets, formats and threads
# agreeing on a verdict. `make test` (CI) runs everything else; docs/results.md holds the zoo-scale figures.
DETECTION_TESTS = frozenset(
    {
        "test_43_class_backdoor_is_flagged_by_the_default_staged_scan",
        "test_a_2x2_badnets_model_trained_here_is_flagged",
        "test_adaptive_mask_cost_shrinks_the_target_to_the_patch",
        "test_neural_cleanse_baseline_finds_the_same_target",
        "test_one_thread_gives_the_same_verdict",
        "test_a_converted_onnx_copy_gives_the_same_verdict",
        "test_pairs_family_names_the_pair_or_the_mapping",
        "test_a_named_pair_screens_its_source_by_erasure",
        "test_a_3x3_corner_source_specific_patch_is_found_by_the_staged_pairs_stage",
        "test_clean_model_is_not_flagged",
    }
)


# `make test` runs on two workers, a module on one (`--dist loadfile`), in collection order: the longest modules go
# first so that the run does not end on one worker with a long module while the other waits (CPU seconds on one
# thread, 2026-12-03; a module not listed runs after these, in name order).
LONGEST_FIRST = (
    "test_fleet",
    "test_hostile",
    "test_hub",
    "test_scan",
    "test_filter",
    "test_mechanisms",
    "test_families",
    "test_loading",
    "test_gate",
    "test_killed",
    "test_staged",
)


def pytest_collection_modifyitems(config, items):
    weight = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: weight.get(item.module.__name__.rsplit(".", 1)[-1], len(weight)))  # stable
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        name = item.originalname if hasattr(item, "originalname") else item.name
        uses_slow = bool(SLOW_FIXTURES & set(getattr(item, "fixturenames", ())))
        if uses_slow or name in SLOW_TESTS or (module in SLOW_MODULES and name not in FAST_IN_SLOW_MODULES):
            item.add_marker(pytest.mark.slow)
        if name in DETECTION_TESTS:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.detection)
