"""Helpers of the tests that compare our detectors with torchvision's on shared weights."""
import torch


def smooth_images(sizes, seed=1234):
    """Images of the given (h, w) with smooth structure (upsampled noise), like real pictures."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for h, w in sizes:
        small = torch.rand(1, 3, max(h // 8, 2), max(w // 8, 2), generator=g)
        images.append(torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear")[0].clamp(0, 1))
    return images


def run_with_proposals(model, batches):
    """Outputs and RPN proposals (captured by a forward hook) of each batch."""
    proposals = []
    handle = model.rpn.register_forward_hook(lambda m, i, o: proposals.extend(b.clone() for b in o[0]))
    outputs = []
    try:
        with torch.no_grad():
            for batch in batches:
                outputs.extend(model(batch))
    finally:
        handle.remove()
    return outputs, proposals


def run_both(tv, ours, images, batching: str, *, atol: float = 0.0):
    """Both models over ``images`` ("batched" or "one_at_a_time"); asserts their RPN proposals
    agree (within ``atol``, in the same order) and returns (tv outputs, our outputs, proposals compared)."""
    batches = [images] if batching == "batched" else [[im] for im in images]
    tv_out, tv_props = run_with_proposals(tv, batches)
    our_out, our_props = run_with_proposals(ours, batches)
    assert len(tv_props) == len(our_props) == len(images)
    compared = 0
    for p_tv, p_ours in zip(tv_props, our_props):
        assert p_tv.shape == p_ours.shape
        torch.testing.assert_close(p_ours, p_tv, rtol=0, atol=atol)
        compared += len(p_tv)
    return tv_out, our_out, compared
