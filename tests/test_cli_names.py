"""One spelling per concept across the command lines; the published spellings stay accepted.

Canonical names: ``--output_dir`` for every output folder, ``--nb_instances_val``,
``--input_deps``, ``--amp {auto,bf16,fp32}``, ``--resume [PATH]`` (alone or ``auto``: the
run's own last checkpoint) and ``--seed`` (default 0). The earlier spellings are aliases.
"""
import shlex

import pytest

from pytorch import train
from runtime.cli import AMP_CHOICES
from models import convert as convert_checkpoint
from finetune import classification as finetune_classification
from finetune import segmentation as finetune_segmentation
from preparation import phantoms
from preparation import prepare as prepare_dataset
from experiments import transfer_benchmark
from self_discovery import feature_extractor, pattern_generator_3D, train_autoencoder

CLIS = {
    "scripts/prepare_dataset.py": prepare_dataset,
    "self_discovery/train_autoencoder.py": train_autoencoder,
    "self_discovery/feature_extractor.py": feature_extractor,
    "self_discovery/pattern_generator_3D.py": pattern_generator_3D,
    "pytorch/train.py": train,
    "scripts/finetune_classification.py": finetune_classification,
    "scripts/finetune_segmentation.py": finetune_segmentation,
    "scripts/convert_checkpoint.py": convert_checkpoint,
    "scripts/phantoms.py": phantoms,
    "experiments/transfer_benchmark.py": transfer_benchmark,
}

#: The original README's commands, verbatim (each one line there split over several).
ORIGINAL_README_COMMANDS = [
    "python -W ignore self_discovery/train_autoencoder.py \n--data_dir dataset/ ",
    "python -W ignore self_discovery/feature_extractor.py \n--data_dir dataset/  \n"
    "--weights self_discovery/Checkpoints/Autoencoder/Unet_autoencoder.h5",
    "python -W ignore self_discovery/pattern_generator_3D.py \n--data_dir dataset/  \n--multi_res\n",
    "python -W ignore pytorch/train.py\n--data_dir self_discovery/Semantic_Genesis_data",
]

#: Concept (the attribute every CLI stores it in) -> the CLIs that have it.
CONCEPTS = {
    "output_dir": ["scripts/prepare_dataset.py", "self_discovery/train_autoencoder.py",
                   "self_discovery/feature_extractor.py", "self_discovery/pattern_generator_3D.py",
                   "pytorch/train.py", "scripts/finetune_classification.py",
                   "scripts/finetune_segmentation.py", "scripts/phantoms.py",
                   "experiments/transfer_benchmark.py"],
    "nb_instances_val": ["self_discovery/pattern_generator_3D.py", "pytorch/train.py"],
    "input_deps": ["self_discovery/train_autoencoder.py", "self_discovery/feature_extractor.py",
                   "self_discovery/pattern_generator_3D.py", "pytorch/train.py"],
    "amp": ["self_discovery/train_autoencoder.py", "self_discovery/feature_extractor.py",
            "pytorch/train.py"],
    "resume": ["self_discovery/train_autoencoder.py", "pytorch/train.py",
               "scripts/finetune_classification.py", "scripts/finetune_segmentation.py"],
    "seed": ["scripts/prepare_dataset.py", "self_discovery/train_autoencoder.py",
             "self_discovery/pattern_generator_3D.py", "pytorch/train.py",
             "scripts/finetune_classification.py", "scripts/finetune_segmentation.py",
             "scripts/phantoms.py"],
}

#: Earlier spellings: CLI -> [(alias argv, attribute, value)].
ALIASES = {
    "self_discovery/train_autoencoder.py": [(["--checkpoint_dir", "o"], "output_dir", "o"),
                                            (["--amp"], "amp", "auto"),
                                            (["--no-amp"], "amp", "fp32")],
    "self_discovery/feature_extractor.py": [(["--save_dir", "o"], "output_dir", "o"),
                                            (["--input_depth", "16"], "input_deps", 16),
                                            (["--amp"], "amp", "auto"),
                                            (["--no-amp"], "amp", "fp32")],
    "self_discovery/pattern_generator_3D.py": [(["--save", "o"], "output_dir", "o")],
    "pytorch/train.py": [(["--checkpoint_dir", "o"], "output_dir", "o"),
                         (["--nb_val_instances", "3"], "nb_instances_val", 3)],
}

REQUIRED = {  # the least each CLI needs to parse
    "self_discovery/train_autoencoder.py": ["--data_dir", "d"],
    "self_discovery/feature_extractor.py": ["--data_dir", "d", "--weights", "w"],
    "self_discovery/pattern_generator_3D.py": [],
    "pytorch/train.py": ["--data_dir", "d"],
}


def _actions(cli: str) -> dict[str, object]:
    """attribute -> the first option storing it (``--no-amp`` comes after ``--amp``)"""
    found: dict[str, object] = {}
    for action in CLIS[cli].build_parser()._actions:
        found.setdefault(action.dest, action)
    return found


@pytest.mark.parametrize("command", ORIGINAL_README_COMMANDS)
def test_original_readme_commands_parse(command):
    words = shlex.split(command)
    assert words[:3] == ["python", "-W", "ignore"]
    CLIS[words[3]].build_parser().parse_args(words[4:])


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_each_concept_has_one_canonical_flag(concept):
    for cli in CLIS:
        action = _actions(cli).get(concept)
        assert (action is not None) == (cli in CONCEPTS[concept]), (cli, concept)
        if action is None:
            continue
        assert action.option_strings[0] == f"--{concept}", cli
        if concept == "amp":
            assert (action.choices, action.const) == (AMP_CHOICES, "auto"), cli
        elif concept == "resume":
            assert (action.nargs, action.const, action.default) == ("?", "auto", None), cli
        elif concept == "seed":
            assert action.default == 0, cli


@pytest.mark.parametrize("cli", sorted(ALIASES))
def test_earlier_spellings_are_aliases_shown_in_help(cli):
    parser = CLIS[cli].build_parser()
    text = parser.format_help()
    for argv, dest, value in ALIASES[cli]:
        assert getattr(parser.parse_args(REQUIRED[cli] + argv), dest) == value, argv
        assert argv[0] in text, argv
