//! Grammar-constrained decoding: a request may ask that its text match a JSON schema, any JSON
//! object, a regular expression or a Lark grammar. Each step, the tokens that could not continue
//! a match are masked out of the request's logits before it samples.
//!
//! [`llguidance`] does the matching (it is what llama.cpp, vLLM and SGLang use): an Earley parser
//! over a lazily built lexer, which computes a token mask in well under a millisecond for
//! typical JSON schemas, needs no precompilation of the whole grammar against the vocabulary
//! (so compiling a request's schema is cheap), and bounds its own work with fuel limits. It
//! sees the vocabulary through our own tokenizer's token bytes ([`Tokenizer::token_bytes`]), so
//! it works with every tokenizer we load, GGUF's included.
//!
//! Promises:
//! - **Bounded compilation.** A grammar's text is at most [`MAX_GRAMMAR_BYTES`]; compilation
//!   runs on a blocking thread, off the engine thread, under llguidance's size and fuel limits
//!   and [`COMPILE_TIMEOUT`]. What cannot be compiled is refused with llguidance's reason.
//! - **Bounded masks.** Each step's mask computation runs under llguidance's per-step fuel; a
//!   grammar that exhausts it fails its own request and no other.
//! - **Special tokens are never text**: they are marked as such in the vocabulary the matcher
//!   sees, so a grammar can only end with an end-of-sequence token, never spell one.

use crate::model::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Longest grammar text (a JSON schema, a regular expression or a Lark grammar) a request may
/// give. Typical structured-output schemas are a few kilobytes.
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;
/// Longest a grammar may take to compile.
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(2);
/// Grammar size limit in llguidance's terms (symbols in productions): about 100 kB of JSON
/// schema, so a schema within [`MAX_GRAMMAR_BYTES`] that expands past it (deep `$ref` chains,
/// large `anyOf` products) is refused rather than compiled.
const MAX_GRAMMAR_SYMBOLS: usize = 100_000;

/// What a request's text must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrammarSpec {
    /// A JSON schema, as JSON text. Unless the schema says otherwise (llguidance's
    /// `x-guidance` key), the JSON is written on one line with `", "` and `": "` separators,
    /// the way most models were trained to write it.
    JsonSchema(String),
    /// Any JSON object.
    JsonObject,
    /// A regular expression the whole text matches.
    Regex(String),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

/// Why a grammar was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    #[error("the grammar is {size} bytes; the most is {MAX_GRAMMAR_BYTES}")]
    TooLarge { size: usize },
    #[error("the JSON schema is not valid JSON: {0}")]
    NotJson(String),
    #[error("the grammar cannot be compiled: {0}")]
    Invalid(String),
    #[error("the grammar took longer than {COMPILE_TIMEOUT:?} to compile")]
    TimedOut,
    #[error("grammar-constrained decoding is unavailable on this backend: {0}")]
    Unavailable(String),
}

/// Compiles grammars against one model's vocabulary.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    /// Built once, on first use or in the background at start (it indexes the vocabulary).
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("vocab_size", &self.vocab_size).finish_non_exhaustive()
    }
}

impl Grammars {
    /// Grammars over the model's `vocab_size` logits, spelled by `tokenizer`.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Arc<Grammars> {
        Arc::new(Grammars { tokenizer, vocab_size, factory: OnceLock::new() })
    }

    /// Indexes the vocabulary now, on a thread of its own, so the first constrained request
    /// does not wait for it.
    pub fn prepare_in_background(self: &Arc<Self>) {
        let grammars = self.clone();
        let spawned = std::thread::Builder::new().name("switchyard-grammars".into()).spawn(move || {
            if let Err(e) = grammars.factory() {
                tracing::warn!(error = %e, "grammar-constrained decoding is unavailable");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not index the vocabulary in the background");
        }
    }

    fn factory(&self) -> Result<&Arc<ParserFactory>, GrammarError> {
        self.factory
            .get_or_init(|| build_factory(&self.tokenizer, self.vocab_size))
            .as_ref()
            .map_err(|e| GrammarError::Unavailable(e.clone()))
    }

    /// Compiles `spec` on a blocking thread, within [`COMPILE_TIMEOUT`].
    pub async fn compile(self: &Arc<Self>, spec: GrammarSpec) -> Result<Constraint, GrammarError> {
        let grammars = self.clone();
        let compiled = tokio::task::spawn_blocking(move || grammars.compile_blocking(&spec));
        match tokio::time::timeout(COMPILE_TIMEOUT, compiled).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(GrammarError::Invalid(format!("the compiler failed: {e}"))),
            // The blocking thread finishes on its own, within llguidance's fuel limits.
            Err(_) => Err(GrammarError::TimedOut),
        }
    }

    /// Compiles `spec` on this thread.
    pub fn compile_blocking(&self, spec: &GrammarSpec) -> Result<Constraint, GrammarError> {
        let size = match spec {
            GrammarSpec::JsonSchema(s) | GrammarSpec::Regex(s) | GrammarSpec::Lark(s) => s.len(),
            GrammarSpec::JsonObject => 0,
        };
        if size > MAX_GRAMMAR_BYTES {
            return Err(GrammarError::TooLarge { size });
        }
        let grammar = match spec {
            GrammarSpec::JsonSchema(text) => {
                let mut schema: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| GrammarError::NotJson(e.to_string()))?;
                compact_unless_told(&mut schema)?;
                TopLevelGrammar::from_json_schema(schema)
            }
            GrammarSpec::JsonObject => {
                let mut schema = serde_json::json!({"type": "object"});
                compact_unless_told(&mut schema)?;
                TopLevelGrammar::from_json_schema(schema)
            }
            GrammarSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GrammarSpec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let factory = self.factory()?;
        let parser = factory.create_parser(grammar).map_err(|e| GrammarError::Invalid(first_line(&e.to_string())))?;
        let mut matcher = Matcher::new(Ok(parser));
        // The first mask is where a grammar that can match nothing shows itself.
        let first = matcher.compute_mask().map_err(|e| GrammarError::Invalid(first_line(&e.to_string())))?;
        if first.is_zero() {
            return Err(GrammarError::Invalid("the grammar matches no text".into()));
        }
        Ok(Constraint { matcher, first: Some(first) })
    }
}

/// One line of llguidance's message (it may append the grammar and the parser state).
fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or("unknown error").trim().to_string()
}

/// Gives a schema llguidance's compact formatting unless it chose its own (`x-guidance`).
fn compact_unless_told(schema: &mut serde_json::Value) -> Result<(), GrammarError> {
    let object = match schema {
        serde_json::Value::Object(o) => o,
        // `true` / `false` are schemas too; llguidance reads them.
        serde_json::Value::Bool(_) => return Ok(()),
        _ => return Err(GrammarError::Invalid("a JSON schema must be an object or a boolean".into())),
    };
    object.entry("x-guidance").or_insert_with(
        || serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
    );
    Ok(())
}

/// The vocabulary as llguidance sees it: each token's bytes, special tokens marked as such,
/// and every end-of-sequence token.
fn build_factory(tokenizer: &Arc<Tokenizer>, vocab_size: usize) -> Result<Arc<ParserFactory>, String> {
    let eos = tokenizer.eos_ids();
    let first_eos = *eos.first().ok_or("the model names no end-of-sequence token")?;
    let vocab = u32::try_from(vocab_size).map_err(|_| format!("a vocabulary of {vocab_size} tokens is too large"))?;
    let words: Vec<Vec<u8>> = (0..vocab)
        .map(|id| {
            let bytes = tokenizer.token_bytes(id);
            if tokenizer.is_special(id) || eos.contains(&id) {
                let mut marked = Vec::with_capacity(bytes.len() + 1);
                marked.push(TokTrie::SPECIAL_TOKEN_MARKER);
                marked.extend_from_slice(bytes);
                marked
            } else {
                bytes.to_vec()
            }
        })
        .collect();
    let trie = TokTrie::from(&TokRxInfo::new(vocab, first_eos), &words).with_eos_tokens(eos);
    let env: TokEnv = Arc::new(Vocabulary { tokenizer: tokenizer.clone(), trie });
    let mut factory = ParserFactory::new(
        &env,
        InferenceCapabilities::default(),
        &llguidance::earley::SlicedBiasComputer::general_slices(),
    )
    .map_err(|e| e.to_string())?;
    factory.quiet();
    factory.limits_mut().max_grammar_size = MAX_GRAMMAR_SYMBOLS;
    Ok(Arc::new(factory))
}

/// Our tokenizer behind llguidance's tokenizer interface (it tokenizes the text a grammar
/// forces, to look ahead).
struct Vocabulary {
    tokenizer: Arc<Tokenizer>,
    trie: TokTrie,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        // Text that fails to encode (it cannot, for valid UTF-8) falls back to the trie's greedy
        // spelling, which is always some tokenization.
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.encode_plain(text).unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
        })
    }
}

/// A request's compiled grammar and where its text stands in it.
pub struct Constraint {
    matcher: Matcher,
    /// The mask computed at compile time, for the first step.
    first: Option<SimpleVob>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish_non_exhaustive()
    }
}

/// The tokens allowed at one position.
#[derive(Debug, Clone)]
pub struct Mask(SimpleVob);

impl Mask {
    /// Sets the logit of every token the grammar does not allow here to −∞.
    pub fn apply(&self, logits: &mut [f32]) {
        const BITS: usize = 32;
        for (word_at, &word) in self.0.as_slice().iter().enumerate() {
            if word == u32::MAX {
                continue;
            }
            let base = word_at * BITS;
            for bit in 0..BITS {
                if word & (1 << bit) == 0
                    && let Some(l) = logits.get_mut(base + bit)
                {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }

    pub fn allows(&self, token: u32) -> bool {
        self.0.is_allowed(token)
    }
}

impl Constraint {
    /// The tokens that may come next. Fails when the grammar ran out of fuel here or allows
    /// nothing (it cannot, once it has compiled, unless it is broken).
    pub fn mask(&mut self) -> Result<Mask, String> {
        let mask = match self.first.take() {
            Some(first) => first,
            None => self.matcher.compute_mask().map_err(|e| first_line(&e.to_string()))?,
        };
        if mask.is_zero() {
            return Err("the grammar allows no token here".into());
        }
        Ok(Mask(mask))
    }

    /// Moves past `token` (one the last mask allowed).
    pub fn accept(&mut self, token: u32) -> Result<(), String> {
        self.first = None;
        self.matcher.consume_token(token).map_err(|e| first_line(&e.to_string()))
    }

    /// Whether the text is complete: the grammar allows nothing more.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampling::{Sampler, SamplingParams};
    use crate::model::Model;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn grammars() -> (Arc<Grammars>, Arc<Tokenizer>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/tiny-llama");
        let model = Model::load(&dir).expect("fixture model");
        let tokenizer = Arc::new(model.tokenizer);
        (Grammars::new(tokenizer.clone(), model.config.vocab_size), tokenizer)
    }

    /// A random walk under `spec` of at most 400 tokens: its text, and whether the grammar
    /// ended it (end of sequence, or a complete text) rather than the step limit.
    fn walk(g: &Grammars, tokenizer: &Tokenizer, spec: &GrammarSpec, seed: u64) -> (String, bool) {
        let mut c = g.compile_blocking(spec).expect("compiles");
        let params = SamplingParams { temperature: 1.0, seed: Some(seed), ..SamplingParams::default() };
        let mut sampler = Sampler::new(params, &[]);
        let mut rng = ChaCha8Rng::seed_from_u64(!seed);
        let mut bytes = Vec::new();
        let mut ended = false;
        for _ in 0..400 {
            let mut logits: Vec<f32> = (0..g.vocab_size).map(|_| rng.random::<f32>() * 8.0).collect();
            let mask = c.mask().expect("a mask");
            mask.apply(&mut logits);
            let token = sampler.sample(&logits);
            assert!(mask.allows(token));
            if tokenizer.eos_ids().contains(&token) {
                ended = true;
                break;
            }
            bytes.extend_from_slice(tokenizer.token_bytes(token));
            c.accept(token).expect("accepts an allowed token");
            if c.is_complete() {
                ended = true;
                break;
            }
        }
        // A walk cut short by the step limit may end inside a character.
        (String::from_utf8_lossy(&bytes).into_owned(), ended)
    }

    /// [`walk`]'s text.
    fn generate(g: &Grammars, tokenizer: &Tokenizer, spec: &GrammarSpec, seed: u64) -> String {
        walk(g, tokenizer, spec, seed).0
    }

    #[test]
    fn text_sampled_under_a_schema_from_random_logits_is_json_the_schema_accepts() {
        let (g, tokenizer) = grammars();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 6},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "mood": {"enum": ["happy", "sad"]},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3},
            },
            "required": ["name", "age", "mood", "tags"],
            "additionalProperties": false,
            "$defs": {"tag": {"type": "string", "pattern": "^[a-z]{1,4}$"}},
        });
        let spec = GrammarSpec::JsonSchema(schema.to_string());
        for seed in 0..20 {
            let text = generate(&g, &tokenizer, &spec, seed);
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let o = v.as_object().expect("an object");
            assert_eq!(o.len(), 4, "{text}");
            assert!(o["name"].as_str().is_some_and(|n| n.chars().count() <= 6), "{text}");
            assert!(o["age"].as_i64().is_some_and(|a| (0..=150).contains(&a)), "{text}");
            assert!(["happy", "sad"].contains(&o["mood"].as_str().unwrap_or_default()), "{text}");
            let tags = o["tags"].as_array().expect("tags");
            assert!(tags.len() <= 3, "{text}");
            for t in tags {
                let t = t.as_str().expect("a string tag");
                assert!((1..=4).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_lowercase()), "{text}");
            }
            // Written the compact way: one line, ", " and ": " separators.
            assert!(!text.contains('\n') && text.starts_with("{\"") && text.contains("\": "), "{text}");
        }
    }

    #[test]
    fn json_object_and_regex_constraints_hold() {
        let (g, tokenizer) = grammars();
        for seed in 0..10 {
            let (text, ended) = walk(&g, &tokenizer, &GrammarSpec::JsonObject, seed);
            // A random walk may run out of steps inside a long object (even right after a `}`
            // inside a string); what it wrote parses when the grammar ended it, and is always
            // the start of an object.
            assert!(text.starts_with('{'), "{text}");
            if ended {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
                assert!(v.is_object());
            }
            let text = generate(&g, &tokenizer, &GrammarSpec::Regex("(yes|no) [0-9]{2,3}".into()), seed);
            let (word, digits) = text.split_once(' ').unwrap_or_else(|| panic!("{text:?}"));
            assert!(["yes", "no"].contains(&word) && (2..=3).contains(&digits.len()), "{text}");
            assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{text}");
        }
        let text = generate(&g, &tokenizer, &GrammarSpec::Lark("start: \"ok\" | \"no\"".into()), 1);
        assert!(["ok", "no"].contains(&text.as_str()), "{text}");
    }

    #[test]
    fn a_grammar_never_spells_a_special_token_and_ends_only_with_end_of_sequence() {
        let (g, tokenizer) = grammars();
        // A regex that `<|im_end|>` would match as text: the special token is no text.
        let mut c = g.compile_blocking(&GrammarSpec::Regex("[<|a-z_>]{1,12}".into())).expect("compiles");
        let mask = c.mask().expect("mask");
        assert!(!mask.allows(0) && !mask.allows(1) && !mask.allows(2), "special tokens are not text");
        // Once complete text is possible, the end-of-sequence token is allowed.
        let a = tokenizer.encode("a").expect("encodes")[0];
        c.accept(a).expect("accepts");
        assert!(c.mask().expect("mask").allows(2));
    }

    #[test]
    fn bad_grammars_are_refused_naming_the_problem() {
        let (g, _) = grammars();
        let refused = |spec: GrammarSpec| g.compile_blocking(&spec).expect_err("refused");
        assert!(matches!(refused(GrammarSpec::JsonSchema("{not json".into())), GrammarError::NotJson(_)));
        let e = refused(GrammarSpec::JsonSchema(r#"{"type": "frobnicate"}"#.into()));
        assert!(matches!(&e, GrammarError::Invalid(m) if m.contains("frobnicate")), "{e}");
        let e = refused(GrammarSpec::JsonSchema("[1, 2]".into()));
        assert!(e.to_string().contains("must be an object"), "{e}");
        let e = refused(GrammarSpec::JsonSchema(r##"{"$ref": "#/$defs/missing"}"##.into()));
        assert!(matches!(e, GrammarError::Invalid(_)), "{e}");
        let e = refused(GrammarSpec::Regex("(unclosed".into()));
        assert!(matches!(e, GrammarError::Invalid(_)), "{e}");
        let e = refused(GrammarSpec::Lark("start: undefined_rule".into()));
        assert!(matches!(e, GrammarError::Invalid(_)), "{e}");
        let big = format!(r#"{{"description": "{}"}}"#, "x".repeat(MAX_GRAMMAR_BYTES));
        assert!(matches!(refused(GrammarSpec::JsonSchema(big)), GrammarError::TooLarge { .. }));
    }
}
