"""Real browser: any architecture on the Inspect page; a discovered skip turned off changes the predictions."""

from __future__ import annotations

import pytest
from e2ehelpers import assert_no_exception, error_texts, open_page, page_url, pick, plot_data, poll, screenshot, wait_idle

pytestmark = pytest.mark.browser


def _topk(page) -> dict[str, dict[str, float]] | None:
    """The top-k chart as {trace name: {class: probability}}."""
    chart = next((p for p in plot_data(page) if p["title"].startswith("Top-")), None)
    if chart is None:
        return None
    return {t["name"]: dict(zip(t["y"], t["x"], strict=True)) for t in chart["traces"]}


def test_inspect_torchvision_resnet18_skip_off_changes_predictions(server, page) -> None:
    open_page(page, page_url(server.url, "inspect"), "h1")
    pick(page, "Any architecture")
    wait_idle(page, 120)
    pick(page, "Built-in picture")
    poll(lambda: "8 skip connections found" in page.inner_text("body") and _topk(page), 180,
         what="torchvision resnet18 traced and its predictions")
    wait_idle(page, 120)
    before = _topk(page)
    assert len(before) == 1, before  # intact: one set of bars
    assert "resnet18" in page.inner_text("body")
    screenshot(page, "inspect-any-resnet18")

    pick(page, "All off (group 2)", role="checkbox")
    poll(lambda: (t := _topk(page)) and len(t) == 2, 120, what="the modified vs intact bars")
    wait_idle(page, 120)
    after = _topk(page)
    screenshot(page, "inspect-any-skip-off")
    assert_no_exception(page)
    assert error_texts(page) == []
    intact, modified = next(iter(before.values())), after["modified"]
    kept = set(after["intact"]) & set(intact)  # the bars follow the modified model's top classes
    assert all(after["intact"][k] == intact[k] for k in kept)  # the intact model is unchanged
    shared = set(intact) & set(modified)
    assert set(modified) != set(intact) or any(abs(modified[c] - intact[c]) > 1e-6 for c in shared), (intact, modified)
    assert "Modified net: skip off: 2, 3" in page.inner_text("body")
