//! The tiny fixture tokenizer (a copy of parity/qwen2-tiny's) and config-loading edge cases.

use std::path::PathBuf;

use twinkle::tokenize::{ChatMessage, TokenizeError, Tokenizer};

fn tiny_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer-tiny")
}

/// A temp dir with the tiny tokenizer.json and the given config files.
fn dir_with(files: &[(&str, &str)]) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(tiny_dir().join("tokenizer.json"), dir.path().join("tokenizer.json"))?;
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text)?;
    }
    Ok(dir)
}

#[test]
fn tiny_tokenizer_loads_with_its_specials() -> anyhow::Result<()> {
    let t = Tokenizer::from_dir(tiny_dir())?;
    assert_eq!(t.vocab_size(), 386);
    assert_eq!(t.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(t.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(t.token_to_id("<|im_end|>"), Some(2));
    // eos_token "<|im_end|>" and generation_config's eos_token_id 2 are the same id.
    assert_eq!(t.eos_token_ids(), &[2]);
    let text = "hello world, a tiny test!";
    let ids = t.encode(text, false)?;
    assert_eq!(t.decode(&ids, false)?, text);
    assert_eq!(t.encode("<|im_start|>", false)?, vec![1]);
    Ok(())
}

#[test]
fn tiny_chat_template() -> anyhow::Result<()> {
    let t = Tokenizer::from_dir(tiny_dir())?;
    let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "hello")];
    assert_eq!(
        t.apply_chat_template(&messages, true)?,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        t.apply_chat_template(&messages[1..], false)?,
        "<|im_start|>user\nhello<|im_end|>\n"
    );
    Ok(())
}

#[test]
fn eos_ids_merge_generation_config_and_accept_object_tokens() -> anyhow::Result<()> {
    let dir = dir_with(&[
        ("tokenizer_config.json", r#"{"eos_token": {"content": "<|im_end|>", "special": true}}"#),
        ("generation_config.json", r#"{"eos_token_id": [2, 0]}"#),
    ])?;
    let t = Tokenizer::from_dir(dir.path())?;
    assert_eq!(t.eos_token_ids(), &[2, 0]);
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    assert!(!t.has_chat_template());
    assert!(matches!(t.apply_chat_template(&[], true), Err(TokenizeError::NoChatTemplate)));
    Ok(())
}

#[test]
fn chat_template_from_jinja_file_and_list_form() -> anyhow::Result<()> {
    let msgs = [ChatMessage::new("user", "x")];
    let dir = dir_with(&[(
        "chat_template.jinja",
        "{% for m in messages %}[{{ m.role }}:{{ m.content|upper }}]{% endfor %}\n",
    )])?;
    assert_eq!(Tokenizer::from_dir(dir.path())?.apply_chat_template(&msgs, false)?, "[user:X]");
    let config = r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ add_generation_prompt }}"}]}"#;
    let dir = dir_with(&[("tokenizer_config.json", config)])?;
    assert_eq!(Tokenizer::from_dir(dir.path())?.apply_chat_template(&msgs, true)?, "DTrue");
    Ok(())
}

#[test]
fn template_features_hf_templates_rely_on() -> anyhow::Result<()> {
    // trim_blocks/lstrip_blocks, Python string methods, loop controls, raise_exception, and
    // booleans printed the Python way ("True"), as Jinja2 does.
    let template = "{% for m in messages %}\n    {% if m.role == 'skip' %}{% continue %}{% endif %}\n\
                    {{ m.content.strip().upper() }}|{{ m.content.startswith(' a') }}\n{% endfor %}\
                    {% if messages|length > 2 %}{{ raise_exception('too many') }}{% endif %}";
    let config =
        serde_json::json!({"chat_template": template, "bos_token": "<|endoftext|>"}).to_string();
    let dir = dir_with(&[("tokenizer_config.json", &config)])?;
    let t = Tokenizer::from_dir(dir.path())?;
    let msgs = [ChatMessage::new("user", " ab "), ChatMessage::new("skip", "zz")];
    assert_eq!(t.apply_chat_template(&msgs, false)?, "AB|True\n");
    let three = [msgs[0].clone(), msgs[0].clone(), msgs[0].clone()];
    match t.apply_chat_template(&three, false) {
        Err(TokenizeError::Template(why)) => assert!(why.contains("too many"), "{why}"),
        other => panic!("expected a template error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn added_tokens_from_the_config_join_the_vocabulary() -> anyhow::Result<()> {
    let config = r#"{"added_tokens_decoder": {
        "2": {"content": "<|im_end|>", "special": true},
        "387": {"content": "<tool>", "special": false},
        "386": {"content": "<|extra|>", "special": true}}}"#;
    let dir = dir_with(&[("tokenizer_config.json", config)])?;
    let t = Tokenizer::from_dir(dir.path())?;
    assert_eq!(t.vocab_size(), 388);
    assert_eq!(t.token_to_id("<|extra|>"), Some(386));
    assert_eq!(t.encode("a<|extra|><tool>", false)?[1..], [386, 387]);
    assert_eq!(t.decode(&[386, 387], true)?, "<tool>");

    let gap = r#"{"added_tokens_decoder": {"400": {"content": "<x>", "special": true}}}"#;
    let dir = dir_with(&[("tokenizer_config.json", gap)])?;
    let err = Tokenizer::from_dir(dir.path());
    assert!(
        matches!(&err, Err(TokenizeError::Config { message, .. }) if message.contains("400")),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn bad_directories_are_clear_errors() -> anyhow::Result<()> {
    let empty = tempfile::tempdir()?;
    assert!(matches!(Tokenizer::from_dir(empty.path()), Err(TokenizeError::Io { .. })));
    let dir = dir_with(&[("tokenizer_config.json", "{not json")])?;
    assert!(matches!(Tokenizer::from_dir(dir.path()), Err(TokenizeError::Config { .. })));
    let dir = dir_with(&[("tokenizer_config.json", r#"{"eos_token": "</s>"}"#)])?;
    let err = Tokenizer::from_dir(dir.path());
    assert!(
        matches!(&err, Err(TokenizeError::Config { message, .. }) if message.contains("</s>")),
        "{err:?}"
    );
    let bad = tempfile::tempdir()?;
    std::fs::write(bad.path().join("tokenizer.json"), "{}")?;
    assert!(matches!(Tokenizer::from_dir(bad.path()), Err(TokenizeError::Load { .. })));
    // A template that does not compile only fails when it is used.
    let dir = dir_with(&[("tokenizer_config.json", r#"{"chat_template": "{% for %}"}"#)])?;
    let t = Tokenizer::from_dir(dir.path())?;
    assert!(matches!(t.apply_chat_template(&[], false), Err(TokenizeError::Template(_))));
    assert_eq!(t.encode("hi", false)?.len(), 2);
    Ok(())
}
