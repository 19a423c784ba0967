//! Streamed answers: OpenAI's SSE chunks for each choice, interleaved as the backends produce
//! them, then the usage of all of them (when asked for) and `[DONE]`. When the client goes
//! away, axum drops the stream, which drops the backend calls and cancels the generations there.

use super::inference::{Job, Record, ended_early, finish_reason, openai_usage, tokens_text, with_calls};
use crate::dispatch::{self, Started};
use crate::openai::response::{Chunk, Logprobs};
use crate::openai::tools::{CallReader, Read};
use crate::openai::{self};
use crate::upstream::{self, Piece};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::stream::{BoxStream, SelectAll};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

/// What a choice's stream gives the merged stream.
enum Out {
    Event(Event),
    /// The choice ended, with its usage.
    Finished(u32, Option<upstream::Usage>),
    /// The choice broke off: the status to record, and the error event to send.
    Failed(u16, Event),
}

/// Where one choice's stream is.
enum Phase {
    /// Chat streams open with the assistant role.
    Role,
    Body,
    /// The final text was sent; the finish reason goes next.
    Finish(&'static str),
    /// The finish reason was sent; the merged stream hears of the end next.
    Finished,
    End,
}

/// One choice: a backend's generation turned into chunks.
struct Choice {
    index: u32,
    job: Arc<Job>,
    record: Arc<Mutex<Record>>,
    backend: String,
    pending: Option<Piece>,
    rest: upstream::TokenStream,
    phase: Phase,
    /// From the final message.
    usage: Option<upstream::Usage>,
    /// Log-probabilities of tokens whose text has not been sent yet (it may be held back while
    /// it could still be a stop string), and where the next token's text starts.
    held: Vec<upstream::TokenLogprobs>,
    offset: usize,
    /// Reads tool calls out of the text, when the request offered tools to call.
    calls: Option<CallReader>,
    /// What the call reader gave back, still to send; then the finish reason, if it came.
    outbox: VecDeque<Read>,
    finishing: Option<&'static str>,
    /// Tool calls sent so far.
    sent_calls: usize,
    _in_flight: dispatch::InFlight,
}

impl Choice {
    fn chunk(&self, chunk: Chunk<'_>) -> Event {
        Event::default().data(self.job.head.chunk(self.index, chunk))
    }

    /// The held log-probabilities for the next chunk: when the client asked for them, and
    /// there are some (or `always`).
    fn logprobs(&self, always: bool) -> Option<Logprobs<'_>> {
        (self.job.logprobs && (always || !self.held.is_empty()))
            .then_some(Logprobs { tokens: &self.held, offset: self.offset })
    }

    /// After a chunk went out with the held log-probabilities (their text ending at `end`).
    fn sent(&mut self, end: Option<usize>) {
        if let Some(end) = end {
            self.offset = end;
        }
        self.held.clear();
    }

    fn record(&self, f: impl FnOnce(&mut Record)) {
        f(&mut self.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    async fn next_out(&mut self) -> Option<Out> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::End) {
                Phase::Role => {
                    self.phase = Phase::Body;
                    return Some(Out::Event(self.chunk(Chunk::Role)));
                }
                Phase::Body if !self.outbox.is_empty() || self.finishing.is_some() => {
                    self.phase = Phase::Body;
                    let event = match self.outbox.pop_front() {
                        Some(Read::Text(t)) => {
                            let l = self.logprobs(true);
                            self.chunk(Chunk::Text(&t, l))
                        }
                        Some(Read::Call(call)) => {
                            let l = self.logprobs(false);
                            let event = self.chunk(Chunk::ToolCall(self.sent_calls, &call, l));
                            self.sent_calls += 1;
                            event
                        }
                        None => {
                            let reason = self.finishing.take().unwrap_or("stop");
                            self.phase = Phase::Finished;
                            let l = self.logprobs(false);
                            self.chunk(Chunk::Finish(reason, l))
                        }
                    };
                    self.sent(None);
                    return Some(Out::Event(event));
                }
                Phase::Body => {
                    let message = match self.pending.take() {
                        Some(m) => Ok(m),
                        None => match self.rest.next().await {
                            Some(r) => r.map_err(|e| dispatch::generation_error(&self.backend, &e, None)),
                            None => Err(ended_early(&self.backend)),
                        },
                    };
                    let message = match message {
                        Ok(m) => m,
                        Err(e) => {
                            // Headers are gone: the error travels as an SSE event, and the
                            // stream ends without [DONE].
                            tracing::warn!(backend = %self.backend, error = %e.message, "generation broke off mid-stream");
                            let event = Event::default().event("error").data(openai::error::body(&e));
                            return Some(Out::Failed(openai::error::status(&e.code).0, event));
                        }
                    };
                    if !message.prompt_logprobs.is_empty() {
                        // The prompt's log-probabilities come alone, first: with echo, they
                        // go out with the prompt's text.
                        self.phase = Phase::Body;
                        let Some(known) = self.job.echo(self.index as usize) else { continue };
                        let prompt = known.map_or_else(|| tokens_text(&message.prompt_logprobs), str::to_string);
                        self.held = message.prompt_logprobs;
                        let l = self.logprobs(false);
                        let event = self.chunk(Chunk::Text(&prompt, l));
                        let end = l.map(openai::response::text_end);
                        self.sent(end);
                        return Some(Out::Event(event));
                    }
                    let text = (!message.text.is_empty()).then_some(message.text.as_str());
                    self.record(|r| {
                        r.tokens_seen += 1;
                        if text.is_some() {
                            r.saw_text();
                        }
                    });
                    let finish = finish_reason(&message);
                    if finish.is_some() {
                        self.usage = message.usage;
                    }
                    self.held.extend(message.logprobs);
                    if let Some(reader) = self.calls.as_mut() {
                        self.outbox.extend(reader.push(&message.text));
                        if finish.is_some() {
                            self.outbox.extend(reader.finish());
                            self.finishing = with_calls(finish, reader.calls());
                        }
                        self.phase = Phase::Body;
                        continue;
                    }
                    match (text, finish) {
                        (None, None) => {
                            self.phase = Phase::Body;
                            continue;
                        }
                        // OpenAI sends the finish reason in a chunk of its own.
                        (Some(t), finish) => {
                            self.phase = finish.map_or(Phase::Body, Phase::Finish);
                            let l = self.logprobs(true);
                            let event = self.chunk(Chunk::Text(t, l));
                            let end = l.map(openai::response::text_end);
                            self.sent(end);
                            return Some(Out::Event(event));
                        }
                        (None, Some(reason)) => {
                            self.phase = Phase::Finished;
                            let l = self.logprobs(false);
                            let event = self.chunk(Chunk::Finish(reason, l));
                            let end = l.map(openai::response::text_end);
                            self.sent(end);
                            return Some(Out::Event(event));
                        }
                    }
                }
                Phase::Finish(reason) => {
                    self.phase = Phase::Finished;
                    return Some(Out::Event(self.chunk(Chunk::Finish(reason, None))));
                }
                Phase::Finished => return Some(Out::Finished(self.index, self.usage)),
                Phase::End => return None,
            }
        }
    }
}

/// Where the merged stream is.
enum After {
    Choices,
    /// `stream_options.include_usage`: a last chunk with the usage and no choices.
    Usage,
    Done,
    End,
}

/// Every choice's chunks as they come, then what follows them.
struct Merged {
    job: Arc<Job>,
    record: Arc<Mutex<Record>>,
    choices: SelectAll<BoxStream<'static, Out>>,
    left: usize,
    usage: Vec<Option<upstream::Usage>>,
    after: After,
}

impl Merged {
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            match std::mem::replace(&mut self.after, After::End) {
                After::Choices => {
                    self.after = After::Choices;
                    match self.choices.next().await {
                        Some(Out::Event(event)) => return Some(event),
                        Some(Out::Finished(index, usage)) => {
                            if let Some(slot) = self.usage.get_mut(index as usize) {
                                *slot = usage;
                            }
                            self.left = self.left.saturating_sub(1);
                            if self.left == 0 {
                                let total = total_usage(&self.usage, self.job.n);
                                self.record
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .finish(200, total.as_ref());
                                self.after = if self.job.include_usage { After::Usage } else { After::Done };
                            }
                        }
                        Some(Out::Failed(status, event)) => {
                            self.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner).finish(status, None);
                            self.after = After::End;
                            return Some(event);
                        }
                        // Every choice ended without finishing (cannot happen: each reports
                        // its end); end the stream as broken.
                        None => return None,
                    }
                }
                After::Usage => {
                    self.after = After::Done;
                    let usage = openai_usage(total_usage(&self.usage, self.job.n).as_ref());
                    return Some(Event::default().data(self.job.head.chunk(0, Chunk::Usage(usage))));
                }
                After::Done => {
                    self.after = After::End;
                    return Some(Event::default().data("[DONE]"));
                }
                After::End => return None,
            }
        }
    }
}

/// The usage of `choices`, `n` a prompt: each prompt once (as its first choice computed
/// it), every choice's completion.
pub(super) fn total_usage(choices: &[Option<upstream::Usage>], n: u32) -> Option<upstream::Usage> {
    choices.first().copied().flatten()?;
    let mut total = upstream::Usage::default();
    for (i, u) in choices.iter().enumerate() {
        let Some(u) = u else { continue };
        if i % n.max(1) as usize == 0 {
            total.prompt_tokens = total.prompt_tokens.saturating_add(u.prompt_tokens);
            total.cached_tokens = total.cached_tokens.saturating_add(u.cached_tokens);
        }
        total.completion_tokens = total.completion_tokens.saturating_add(u.completion_tokens);
    }
    Some(total)
}

/// The streamed answer of `started` (one generation per choice, in choice order).
pub(super) fn stream(job: Job, started: Vec<Started>, record: Record) -> Response {
    let job = Arc::new(job);
    let record = Arc::new(Mutex::new(record));
    let left = started.len();
    let mut choices = SelectAll::new();
    for (index, s) in started.into_iter().enumerate() {
        let Started { backend, first, rest, in_flight } = s;
        let choice = Choice {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            job: job.clone(),
            record: record.clone(),
            backend,
            pending: first,
            rest: rest.0,
            phase: if job.head.api == crate::openai::response::Api::Chat { Phase::Role } else { Phase::Body },
            usage: None,
            held: Vec::new(),
            offset: 0,
            calls: job.reads_calls.then(CallReader::default),
            outbox: VecDeque::new(),
            finishing: None,
            sent_calls: 0,
            _in_flight: in_flight,
        };
        let outs = futures::stream::unfold(choice, |mut c| async move {
            let out = c.next_out().await?;
            Some((out, c))
        });
        choices.push(outs.boxed());
    }
    let merged = Merged { job, record, choices, left, usage: vec![None; left], after: After::Choices };
    let events = futures::stream::unfold(merged, |mut m| async move {
        let event = m.next_event().await?;
        Some((Ok::<Event, Infallible>(event), m))
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
