//! Turning generated token ids into streamed text: incremental detokenization (a token may
//! complete a multi-byte character only together with the next one) and stop strings (text that
//! might be the start of a stop string is held back until it is known not to be).

use crate::model::Tokenizer;

/// Incremental detokenizer for one sequence.
///
/// Decoding a window of the last few tokens and diffing it with the window before the new token
/// yields exactly the new text, including the spaces that tokenizers attach to word starts.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// Starts after `prompt_tail`, the last few prompt tokens, which give the first generated
    /// token its context (so a leading space decodes as it would mid-text).
    pub fn new(prompt_tail: &[u32]) -> Detokenizer {
        Detokenizer { ids: prompt_tail.to_vec(), prefix_offset: 0, read_offset: prompt_tail.len() }
    }

    /// Decodes the window `[prefix_offset, read_offset)` and the window from `prefix_offset` to
    /// the end; the new text is what the second adds to the first.
    fn windows(&self, tok: &Tokenizer) -> (String, String) {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset]).unwrap_or_default();
        let full = tok.decode(&self.ids[self.prefix_offset..]).unwrap_or_default();
        (prefix, full)
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let (prefix, full) = self.windows(tok);
        // An incomplete UTF-8 sequence decodes to U+FFFD: wait for the next token.
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            full[prefix.len()..].to_string()
        } else {
            String::new()
        }
    }

    /// Text of tokens still held back (at the end of generation, emit it as it is).
    pub fn flush(&mut self, tok: &Tokenizer) -> String {
        let (prefix, full) = self.windows(tok);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        full.get(prefix.len()..).unwrap_or_default().to_string()
    }
}

/// Stop-string matching over the generated text.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

/// What a piece of new text means for the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Matched {
    /// Text that can be sent now (may be empty while a possible stop string is held back).
    Continue(String),
    /// A stop string appeared: send this last text (everything before the stop) and finish.
    Stop(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), ..Default::default() }
    }

    pub fn push(&mut self, new_text: &str) -> Matched {
        self.text.push_str(new_text);
        if self.stops.is_empty() {
            return Matched::Continue(self.take(self.text.len()));
        }
        // A stop string may straddle the boundary of what was already sent.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        if let Some(at) = hit {
            return Matched::Stop(self.take(at.max(self.emitted)));
        }
        // Hold back the longest tail that is a proper prefix of some stop string.
        let held = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n) && self.text.ends_with(&s[..n])))
            .max()
            .unwrap_or(0);
        let safe = (self.text.len() - held).max(self.emitted);
        Matched::Continue(self.take(safe))
    }

    /// Everything not yet sent (generation ended for another reason).
    pub fn finish(&mut self) -> String {
        self.take(self.text.len())
    }

    fn take(&mut self, until: usize) -> String {
        let out = self.text[self.emitted..until].to_string();
        self.emitted = until;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(m: &mut StopMatcher, parts: &[&str]) -> (String, bool) {
        let mut out = String::new();
        for p in parts {
            match m.push(p) {
                Matched::Continue(t) => out.push_str(&t),
                Matched::Stop(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stops_before_a_stop_string_split_across_tokens() {
        let mut m = StopMatcher::new(vec!["\n\nUser:".into()]);
        assert_eq!(feed(&mut m, &["Hello", " there\n", "\nUs", "er: hi"]), ("Hello there".into(), true));
    }

    #[test]
    fn holds_back_only_while_a_stop_string_is_possible() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abc E"), Matched::Continue("abc ".into()));
        assert_eq!(m.push("N"), Matched::Continue(String::new()));
        assert_eq!(m.push("x"), Matched::Continue("ENx".into()));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn without_stop_strings_everything_passes_through() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(feed(&mut m, &["a", "b", "é"]), ("abé".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let mut m = StopMatcher::new(vec!["world".into(), "lo w".into()]);
        assert_eq!(feed(&mut m, &["hello world"]), ("hel".into(), true));
    }
}
