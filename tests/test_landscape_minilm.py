"""One short check on the real MiniLM-L6 (LoRA on query/value, 4 sentences): Hugging Face dict batches,
vectorized = looped evaluation, B = 0 tangent spaces, BERT's all-zero pooler bias, model unchanged."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from flatlora.tasks import minilm_dir

    path = str(minilm_dir())
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                            task_type=TaskType.SEQ_CLS))
    tok = AutoTokenizer.from_pretrained(path)
    batch = dict(tok(["a gripping, funny film", "dull and far too long", "the cast is wonderful", "a mess"],
                     padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([1, 0, 1, 0])
    return model, batch


def test_minilm_probes(minilm):
    from flatlora import lora_layers
    from landscape import Loss, loss_line, space
    from landscape.directions import filter_normalized

    model, batch = minilm
    loss = Loss([batch])
    before = {n: t.clone() for n, t in model.state_dict().items()}
    assert loss.evaluate(model)["accuracy"] is not None
    vec = loss_line(model, loss, space="tangent", alphas=3, progress=False)
    loop = loss_line(model, loss, space="tangent", alphas=3, batch_points=1, progress=False)
    np.testing.assert_allclose(vec["loss"], loop["loss"], rtol=1e-5)
    assert vec["loss"][1] == pytest.approx(loss(model), rel=1e-5)  # α = 0 is the model
    views = lora_layers(model)
    assert space(model, "tangent").subspace_dim == sum(v.rank * v.shape[0] for v in views)  # B = 0 at init
    full = space(model, "all")
    pooler_bias = "base_model.model.bert.pooler.dense.bias"
    assert torch.count_nonzero(full.point()[pooler_bias]) == 0
    d = filter_normalized(full, torch.Generator().manual_seed(0))  # no division by its zero norm
    assert all(torch.isfinite(t).all() for t in d.values())
    far = loss_line(model, loss, space=full, direction=d, alphas=[0.5], progress=False)
    assert np.isfinite(far["loss"]).all()
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
