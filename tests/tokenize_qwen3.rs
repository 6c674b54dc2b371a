//! The real Qwen3 tokenizer (assets/tokenizer/qwen3): special ids, known encodings, round trips,
//! streaming detokenization and the vendored chat template.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::json;
use twinkle::tokenize::{ChatMessage, IncrementalDecoder, TokenizeError, Tokenizer};

fn qwen3() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tokenizer/qwen3");
        Tokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
    })
}

#[test]
fn special_tokens_have_their_published_ids() -> anyhow::Result<()> {
    let t = qwen3();
    assert_eq!(t.token_to_id("<|endoftext|>"), Some(151643));
    assert_eq!(t.token_to_id("<|im_start|>"), Some(151644));
    assert_eq!(t.token_to_id("<|im_end|>"), Some(151645));
    assert_eq!(t.token_to_id("<think>"), Some(151667));
    assert_eq!(t.id_to_token(151645).as_deref(), Some("<|im_end|>"));
    // 151,643 BPE entries plus 26 added tokens.
    assert_eq!(t.vocab_size(), 151_669);
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    assert_eq!(t.pad_token(), Some("<|endoftext|>"));
    assert_eq!(t.bos_token(), None);
    // No generation_config.json is vendored, so only tokenizer_config's eos_token counts.
    assert_eq!(t.eos_token_ids(), &[151645]);
    assert!(t.has_chat_template());
    Ok(())
}

#[test]
fn known_encodings() -> anyhow::Result<()> {
    let t = qwen3();
    // Vocabulary entries: "Hello" 9707, "," 11, "Ġworld" 1879, "!" 0, "Ċ" 198, "ä½łå¥½" (你好) 108386.
    assert_eq!(t.encode("Hello, world!", false)?, vec![9707, 11, 1879, 0]);
    assert_eq!(t.encode("你好", false)?, vec![108386]);
    // Special-token text is matched before BPE; "user" 872, "\n" 198.
    assert_eq!(t.encode("<|im_start|>user\n<|im_end|>", false)?, vec![151644, 872, 198, 151645]);
    // Qwen has no BOS/EOS post-processor: add_special changes nothing.
    assert_eq!(t.encode("Hello, world!", true)?, vec![9707, 11, 1879, 0]);
    Ok(())
}

#[test]
fn decode_with_and_without_special_tokens() -> anyhow::Result<()> {
    let t = qwen3();
    let ids = [151644, 872, 198, 9707, 151645];
    assert_eq!(t.decode(&ids, false)?, "<|im_start|>user\nHello<|im_end|>");
    assert_eq!(t.decode(&ids, true)?, "user\nHello");
    // <think> is an added token but not a special one, so it survives skipping.
    assert_eq!(t.decode(&[151667, 9707], true)?, "<think>Hello");
    // Ids in the model's padded embedding rows (151669..151936) have no text.
    assert_eq!(t.decode(&[9707, 151_900], false)?, "Hello");
    Ok(())
}

#[test]
fn round_trips_ascii_cjk_emoji() -> anyhow::Result<()> {
    let t = qwen3();
    for text in [
        "The quick brown fox jumps over the lazy dog.\n  Indented, tabs\tand 1234567890!",
        "机器学习是人工智能的一个分支。日本語のテキスト、한국어 텍스트.",
        "emoji: 🎉🚀👩‍💻 flags 🇫🇷 and skin tones 👍🏽",
        "mixed: déjà vu — «quotes» ∑ x² ≤ ∞ \u{00e9}",
        "",
    ] {
        let ids = t.encode(text, false)?;
        assert_eq!(t.decode(&ids, false)?, text, "{ids:?}");
    }
    Ok(())
}

#[test]
fn streaming_never_splits_a_character() -> anyhow::Result<()> {
    let t = qwen3();
    let text = "Hello 世界 🎉🚀 ok\n😀 👩‍💻 done";
    let ids = t.encode(text, false)?;
    // The test only means something if some token is a partial character on its own.
    let partial =
        ids.iter().filter(|&&id| t.decode(&[id], false).is_ok_and(|s| s.contains('\u{FFFD}')));
    assert!(partial.count() > 0, "no token of {ids:?} splits a character");

    let mut dec = IncrementalDecoder::new(false);
    let mut out = String::new();
    for &id in &ids {
        let delta = dec.push(t, id)?;
        assert!(!delta.contains('\u{FFFD}'), "delta {delta:?} after {id}");
        out.push_str(&delta);
    }
    out.push_str(&dec.flush(t)?);
    assert_eq!(out, text);
    Ok(())
}

#[test]
fn streaming_skips_special_tokens_and_flushes_leftovers() -> anyhow::Result<()> {
    let t = qwen3();
    let mut ids = t.encode("<|im_start|>assistant\nHi 🎉", false)?;
    ids.push(151645);
    let mut dec = IncrementalDecoder::new(true);
    let mut out = String::new();
    for &id in &ids {
        out.push_str(&dec.push(t, id)?);
    }
    assert_eq!(out, "assistant\nHi 🎉");

    // Stop in the middle of a character: nothing is emitted until flush, which shows U+FFFD.
    // "𓀀" (an Egyptian hieroglyph, 4 UTF-8 bytes) is rare enough to be split into byte tokens.
    let rare = t.encode("𓀀", false)?;
    assert!(rare.len() > 1, "𓀀 is one token: {rare:?}");
    let mut dec = IncrementalDecoder::with_context(&t.encode("Hi", false)?, false);
    assert_eq!(dec.push(t, rare[0])?, "");
    assert!(dec.flush(t)?.ends_with('\u{FFFD}'));
    Ok(())
}

#[test]
fn chat_template_system_user_generation_prompt() -> anyhow::Result<()> {
    let t = qwen3();
    let messages =
        [ChatMessage::new("system", "You are helpful."), ChatMessage::new("user", "Hi there")];
    let expected = "<|im_start|>system\nYou are helpful.<|im_end|>\n\
                    <|im_start|>user\nHi there<|im_end|>\n\
                    <|im_start|>assistant\n";
    assert_eq!(t.apply_chat_template(&messages, true)?, expected);
    let without =
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n";
    assert_eq!(t.apply_chat_template(&messages, false)?, without);

    let ids = t.encode(expected, false)?;
    assert_eq!(&ids[..3], &[151644, 8948, 198], "<|im_start|> system \\n");
    assert_eq!(&ids[ids.len() - 3..], &[151644, 77091, 198], "<|im_start|> assistant \\n");
    Ok(())
}

#[test]
fn chat_template_assistant_turn_and_thinking_switch() -> anyhow::Result<()> {
    let t = qwen3();
    // The last assistant turn after the last user query gets an (empty) think block.
    let messages = [ChatMessage::new("user", "2+2?"), ChatMessage::new("assistant", "4")];
    assert_eq!(
        t.apply_chat_template(&messages, false)?,
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n"
    );
    // Reasoning inside the content is split out by the template's string methods.
    let messages = [
        ChatMessage::new("user", "q"),
        ChatMessage::new("assistant", "<think>\nhmm\n</think>\n\nA"),
    ];
    assert_eq!(
        t.apply_chat_template(&messages, false)?,
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nA<|im_end|>\n"
    );
    // enable_thinking=false pre-fills an empty think block after the generation prompt.
    let extra = json!({"enable_thinking": false});
    let extra = extra.as_object().cloned().unwrap_or_default();
    let msgs = json!([{"role": "user", "content": "hi"}]);
    assert_eq!(
        t.apply_chat_template_json(&msgs, true, &extra)?,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    );
    Ok(())
}

#[test]
fn chat_template_tools_use_python_json_separators() -> anyhow::Result<()> {
    let t = qwen3();
    let extra = json!({"tools": [{"function": {"description": "Add <a> & b", "name": "add"}, "type": "function"}]});
    let extra = extra.as_object().cloned().unwrap_or_default();
    let msgs = json!([{"role": "user", "content": "1+1"}]);
    let expected = "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
        You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n\
        {\"function\": {\"description\": \"Add <a> & b\", \"name\": \"add\"}, \"type\": \"function\"}\n</tools>\n\n\
        For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n\
        <tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n\
        <|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(t.apply_chat_template_json(&msgs, true, &extra)?, expected);
    Ok(())
}

#[test]
fn chat_template_errors_are_typed() {
    let t = qwen3();
    // The template indexes messages[0]; an empty conversation is an error, not a panic.
    let err = t.apply_chat_template(&[], true);
    assert!(matches!(err, Err(TokenizeError::Template(_))), "{err:?}");
}

/// Assistant-only labels by round-wise rendering: the labelled tokens are exactly the assistant
/// turns (content and end-of-turn), the tokens equal a whole-text encoding, labels are rolled.
#[test]
fn training_encoding_labels_only_assistant_turns() -> anyhow::Result<()> {
    use twinkle::tokenize::trajectory::{IGNORE, RenderOptions};
    let tok = qwen3();
    let messages: Vec<serde_json::Value> = serde_json::from_str(
        r#"[{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "I am Twinkle."},
            {"role": "user", "content": "And who made you?"},
            {"role": "assistant", "content": "The Twinkle team."}]"#,
    )?;
    let enc = tok.encode_for_training(&messages, &RenderOptions::default())?;
    let full = tok.apply_chat_template_json(&messages, false, &Default::default())?;
    assert_eq!(enc.input_ids, tok.encode(&full, false)?, "segment-wise tokens differ");
    assert_eq!(enc.labels.len(), enc.input_ids.len());
    assert_eq!(*enc.labels.last().unwrap(), IGNORE);
    // Rolled: labels[i] is input_ids[i + 1] wherever it is set.
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut prev = false;
    for i in 0..enc.labels.len() - 1 {
        let on = enc.labels[i] != IGNORE;
        if on {
            assert_eq!(enc.labels[i], i64::from(enc.input_ids[i + 1]));
            if !prev {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(enc.input_ids[i + 1]);
        }
        prev = on;
    }
    let texts: Vec<String> = runs.iter().map(|r| tok.decode(r, false)).collect::<Result<_, _>>()?;
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(texts[0].contains("I am Twinkle.") && texts[0].ends_with("<|im_end|>\n"), "{texts:?}");
    assert!(texts[1].contains("The Twinkle team.") && texts[1].ends_with("<|im_end|>\n"));
    assert!(texts.iter().all(|t| !t.contains("user") && !t.contains("Who are you")));
    // max_length cuts the tail and leaves the last label unset.
    let short = tok.encode_for_training(
        &messages,
        &RenderOptions { max_length: Some(10), ..Default::default() },
    )?;
    assert_eq!(short.input_ids.len(), 10);
    assert_eq!(short.labels[9], IGNORE);
    Ok(())
}
