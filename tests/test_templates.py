import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from coft_fast.models import load_clip
from coft_fast.pseudo import SINGLE_TEMPLATE, TemplateError, check_prompts_fit, class_prompts, clip_ensemble_templates, prompt_token_count
from coft_fast.scoring import class_text_embeddings


def test_single_and_ensemble():
    assert class_prompts("single", ["cat"]) == [["a photo of a cat."]]
    ensemble = class_prompts("ensemble", ["cat", "dog"])
    assert len(ensemble[0]) == 80 == len(clip_ensemble_templates())
    assert "a photo of a dog." in ensemble[1]
    assert SINGLE_TEMPLATE in clip_ensemble_templates()


def test_json_list_and_mapping(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(["a {} in the wild.", "art of a {}."]))
    assert class_prompts(tmp_path / "list.json", ["cat"]) == [["a cat in the wild.", "art of a cat."]]
    mapping = {"cat": ["a small furry pet with whiskers."], "dog": ["a {} that barks.", "a loyal pet."]}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    assert class_prompts(str(tmp_path / "map.json"), ["cat", "dog"]) == [
        ["a small furry pet with whiskers."],
        ["a dog that barks.", "a loyal pet."],
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        ('["no placeholder"]', "has no"),
        ("[]", "non-empty list"),
        ('{"cat": ["x"]}', "class 'dog' needs"),
        ('{"cat": ["x"], "dog": ["y"], "horse": ["z"]}', "horse"),
        ('{"cat": "x", "dog": ["y"]}', "class 'cat' needs"),
        ('{"cat": [], "dog": []}', "class 'cat' needs a non-empty list.*'cat', 'dog'"),
        ('{"cat": ["x", 3], "dog": ["y"]}', "class 'cat' needs .*entry 2 is 3"),
        ('{"cat": ["x"], "dog": [""]}', "class 'dog' needs .*entry 1 is ''"),
        ("{not json", "not valid JSON"),
        ("3", "expected a list"),
    ],
)
def test_template_file_errors(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(TemplateError, match=message):
        class_prompts(path, ["cat", "dog"])


def test_missing_template_file():
    with pytest.raises(TemplateError, match="file not found"):
        class_prompts("nonexistent.json", ["cat"])


def test_token_count_matches_tokenizer():
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    text = "a photo of a sea lion."
    count = prompt_token_count(tokenizer, text)
    ids = tokenizer([text])[0]
    assert count == int((ids != 0).sum())


def test_prompt_that_does_not_fit_is_an_error_naming_the_class():
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=12)
    long_name = "extremely long and elaborate class name with many words"
    with pytest.raises(TemplateError, match="class 'extremely long"):
        check_prompts_fit(tokenizer, [["a cat."], [f"a {long_name}."]], ["cat", long_name], 12)
    check_prompts_fit(tokenizer, [["a cat."]], ["cat"], 12)


def test_text_embeddings_average_normalised_prompt_embeddings(tiny_testbed):
    clip = load_clip(f"local-dir:{tiny_testbed}")
    prompts = [["a photo of a one.", "a drawing of a one."], ["a photo of a two."]]
    embeddings = class_text_embeddings(clip, prompts, ["one", "two"], torch.device("cpu"), batch_size=2)
    with torch.no_grad():
        each = F.normalize(clip.model.encode_text(clip.tokenizer([p for ps in prompts for p in ps])), dim=-1)
    expected = torch.stack([F.normalize(each[:2].mean(0), dim=0), each[2]])
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2))
