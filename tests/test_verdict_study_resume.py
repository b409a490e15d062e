"""`covo.study` interrupted while scoring resumes after the prompts it finished, and ends with
the results of an uninterrupted study."""

from __future__ import annotations

import pytest
from test_study import config, without_times

import covo.analysis.study
from covo.analysis.study import study


def test_interrupted_scoring_resumes_after_the_finished_prompts(tmp_path, monkeypatch):
    whole = study(config(tmp_path, "rewards=[covo,majority]", out=tmp_path / "whole"))
    scored = []
    make_group = covo.analysis.study.make_group

    def counting(loaded, prompt, *args, **kwargs):
        scored.append(prompt)
        if len(scored) == 2 and interrupt:
            raise KeyboardInterrupt  # stopped while scoring the second prompt
        return make_group(loaded, prompt, *args, **kwargs)

    monkeypatch.setattr(covo.analysis.study, "make_group", counting)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        study(config(tmp_path, "rewards=[covo,majority]", out=tmp_path / "first"))
    first_prompt = scored[0]
    scored.clear()
    interrupt = False
    resumed = study(config(tmp_path, "rewards=[covo,majority]", out=tmp_path / "resumed"))
    # the first prompt was finished: only the other two are scored again
    assert len(scored) == 2 and first_prompt not in scored
    assert without_times(resumed) == without_times(whole)
    # written once the study is: a later study scores anew
    assert not list((tmp_path / "cache" / "study").glob("*.partial"))
