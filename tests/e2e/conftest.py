import pytest


@pytest.fixture(scope="session")
def cold_tiny_inputs(tmp_path_factory) -> dict[str, str]:
    """The tiny model, tokenizer and data without a warm start (every reward 0 at first, so
    advantages and gradients are 0 and the weights stay put): paths by name."""
    from ctpo_megatron.data.tiny_setup import TinySetupConfig, prepare_tiny_run
    from ctpo_megatron.data.warm_start import WarmStartConfig

    return prepare_tiny_run(str(tmp_path_factory.mktemp("tiny_cold")),
                            TinySetupConfig(warm_start=WarmStartConfig(steps=0)))
