//! A connection's record as the engine keeps it in memory: every field of a
//! [`Record`] in one exact heap allocation ([`Packed`]), not a 312-byte struct with about ten
//! small allocations of its own (id, label, account, tokens, the sites and their three
//! strings each), whose malloc headers and rounding cost more than the bytes they held:
//! about 850 bytes a connection at the scale bench's 100,000, now its string bytes plus
//! about 80.
//!
//! The packed form is private to the engine: the ledger, the API and the store seam keep
//! using [`Record`]. [`Packed::from`] and [`Packed::to_record`] round-trip exactly (every
//! field, times to the nanosecond, every `Option`); the accessors read what the engine reads
//! often (status, version, id, label, the access token and its expiry, the planner's times,
//! the sites as borrowed views) straight from the bytes, without allocating. A change is a
//! decode, the change, and a new packing (`SlotState::update` in `mod.rs`).
//!
//! Layout, in this order (a string is a varint length and its UTF-8 bytes; a varint is
//! LEB128; a time is the zigzag varint of its seconds minus the previous time's, then that of
//! its nanoseconds minus the previous time's, so that equal or whole-second-apart times take
//! two or three bytes; the first time counts from the epoch):
//!
//! 1. a flags byte ([`flag`]: status and which `Option`s are present);
//! 2. the chain version;
//! 3. the access token (if any), the id, the label: what the token path reads first;
//! 4. the sites: their count, then each one's cloud id, URL, name and scopes (what a
//!    `?site=` lookup checks, so it is reached without reading anything else);
//! 5. the times: access expiry, last refresh, used, rotated, consented, created, updated,
//!    the attempt marker, the previous token's rotation, the last error's (each optional one
//!    only if present), then each site's last sight;
//! 6. the consecutive failures; provider, client id and scopes as references ([`Ref`]);
//! 7. the account, the refresh token, the previous token, the last error's code and message.
//!
//! Provider, client id and scope lists are what nearly every connection holds the same value
//! of ([`SharedStr`], [`Scopes`]): each is kept as its number in a process-wide table
//! ([`INTERNED_MAX`] values at most, never shrinking, as the model's own shared sets), or,
//! past that bound, written out in full.
//!
//! **Architecture Invariant:** no secret in any output: the tokens are inside the bytes,
//! so the bytes are wiped when a `Packed` is dropped (a replaced record included), they are
//! written once into an allocation of the exact size (no growth leaves a copy behind), and
//! `Debug` shows the id, label, status, version and size, never the bytes.

use super::plan::ChainFacts;
use crate::model::{
    AccessToken, Chain, Connection, LastError, Record, Scopes, SharedStr, Site, Status, Time,
};
use crate::secret::Secret;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::LazyLock;

/// The bits of the flags byte.
mod flag {
    /// The status is `needs_reauth` (else `active`).
    pub const NEEDS_REAUTH: u8 = 1;
    /// `account_id` is present.
    pub const ACCOUNT: u8 = 1 << 1;
    /// `last_refresh_at` is present.
    pub const LAST_REFRESH: u8 = 1 << 2;
    /// `last_error` is present.
    pub const LAST_ERROR: u8 = 1 << 3;
    /// `previous` is present.
    pub const PREVIOUS: u8 = 1 << 4;
    /// `attempt_started_at` is present.
    pub const ATTEMPT: u8 = 1 << 5;
    /// `access` is present.
    pub const ACCESS: u8 = 1 << 6;
}

/// How many distinct values each interning table ([`SharedStr`]s, [`Scopes`]) numbers at
/// most: a deployment has one or two providers and client ids and a handful of scope lists;
/// past the bound a value is written out in full in each record, so that a provider
/// answering a new list every time cannot grow the table without end.
pub(crate) const INTERNED_MAX: usize = 1024;

/// A reference to an interned value, as written: 0 for "written out in full here", else the
/// value's number in its table plus one.
type Ref = u64;

/// The [`SharedStr`] values numbered so far.
#[derive(Default)]
struct StrTable {
    /// By number.
    items: Vec<SharedStr>,
    /// Number by value.
    numbers: HashMap<SharedStr, u32>,
}

/// The [`Scopes`] lists numbered so far.
#[derive(Default)]
struct ScopesTable {
    /// By number. Holding each list keeps its allocation alive, so its address in
    /// `numbers` can never be another list's.
    items: Vec<Scopes>,
    /// Number by the address of the list's (shared) allocation: equal lists are one shared
    /// allocation ([`Scopes::new`]), so the address finds them without hashing strings. A
    /// list equal to a numbered one but not shared with it (past the model's own bound) gets
    /// a number of its own, within [`INTERNED_MAX`].
    numbers: HashMap<usize, u32>,
}

/// The interning tables: one per process ([`TABLES`]; tests make small ones of their own).
struct Tables {
    /// Provider names and client ids.
    strs: RwLock<StrTable>,
    /// Scope lists.
    scopes: RwLock<ScopesTable>,
    /// How many values each table numbers at most ([`INTERNED_MAX`]).
    max: usize,
}

/// Every value numbered in this process.
static TABLES: LazyLock<Tables> = LazyLock::new(|| Tables {
    strs: Default::default(),
    scopes: Default::default(),
    max: INTERNED_MAX,
});

impl Tables {
    /// The reference to write for `s`: its number (given now if it has none and the table
    /// has room), else 0.
    fn str_ref(&self, s: &SharedStr) -> Ref {
        if let Some(&n) = self.strs.read().numbers.get(s) {
            return u64::from(n) + 1;
        }
        let mut table = self.strs.write();
        if let Some(&n) = table.numbers.get(s) {
            return u64::from(n) + 1;
        }
        if table.items.len() >= self.max {
            return 0;
        }
        let n = table.items.len() as u32;
        table.items.push(s.clone());
        table.numbers.insert(s.clone(), n);
        u64::from(n) + 1
    }

    /// The reference to write for `s`, as [`Tables::str_ref`].
    fn scopes_ref(&self, s: &Scopes) -> Ref {
        let key = s.as_ptr() as usize;
        if let Some(&n) = self.scopes.read().numbers.get(&key) {
            return u64::from(n) + 1;
        }
        let mut table = self.scopes.write();
        if let Some(&n) = table.numbers.get(&key) {
            return u64::from(n) + 1;
        }
        if table.items.len() >= self.max {
            return 0;
        }
        let n = table.items.len() as u32;
        table.items.push(s.clone());
        table.numbers.insert(key, n);
        u64::from(n) + 1
    }

    /// The value numbered `r - 1`.
    fn str_of(&self, r: Ref) -> SharedStr {
        self.strs.read().items[(r - 1) as usize].clone()
    }

    /// The list numbered `r - 1`.
    fn scopes_of(&self, r: Ref) -> Scopes {
        self.scopes.read().items[(r - 1) as usize].clone()
    }
}

/// Where the encoder writes: first a count of the bytes (so that the allocation is made
/// once, exactly), then the bytes.
trait Out {
    /// Appends `b`.
    fn put(&mut self, b: &[u8]);
}

/// Counts what would be written.
struct Count(usize);

impl Out for Count {
    fn put(&mut self, b: &[u8]) {
        self.0 += b.len();
    }
}

impl Out for Vec<u8> {
    fn put(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
}

/// How many of a record's references ([`Ref`]) the counting pass keeps for the writing
/// pass, which would otherwise look each up in its table again (a lock and a hash each, for
/// every record of a load): the connection's three and five sites' scopes.
const REFS_KEPT: usize = 8;

/// The references of one record in the order the writer looks them up: what the counting
/// pass found, replayed by the writing pass (the same record asks for the same ones).
#[derive(Clone, Copy, Default)]
struct Refs {
    /// The first [`REFS_KEPT`] found.
    kept: [Ref; REFS_KEPT],
    /// How many of `kept` are set.
    len: usize,
    /// Whether this pass replays `kept` (the writing one) or fills it (the counting one).
    replay: bool,
    /// The next reference's place in the order.
    next: usize,
}

/// Writes one record's fields in the layout of the module's doc.
struct Writer<'o, O: Out> {
    /// Where the bytes go.
    out: &'o mut O,
    /// Where the shared values are numbered.
    tables: &'o Tables,
    /// The references found by the counting pass.
    refs: Refs,
    /// The previous time written (seconds, nanoseconds): times are written as differences.
    prev: (i64, i64),
}

impl<O: Out> Writer<'_, O> {
    /// The next reference: the counting pass's if it kept it, else `lookup`'s.
    fn reference(&mut self, lookup: impl FnOnce(&Tables) -> Ref) -> Ref {
        let refs = &mut self.refs;
        let at = refs.next;
        refs.next += 1;
        if refs.replay && at < refs.len {
            return refs.kept[at];
        }
        let r = lookup(self.tables);
        if !refs.replay && at < REFS_KEPT {
            refs.kept[at] = r;
            refs.len = at + 1;
        }
        r
    }

    fn varint(&mut self, mut v: u64) {
        let mut buf = [0u8; 10];
        let mut n = 0;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                buf[n] = byte;
                n += 1;
                break;
            }
            buf[n] = byte | 0x80;
            n += 1;
        }
        self.out.put(&buf[..n]);
    }

    fn signed(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }

    fn str(&mut self, s: &str) {
        self.varint((s.len() as u64) << 1);
        self.out.put(s.as_bytes());
    }

    /// A cloud id: a canonical UUID ([`uuid_bytes`]) as its 16 bytes, anything else as a
    /// string.
    fn cloud_id(&mut self, s: &str) {
        match uuid_bytes(s) {
            Some(b) => {
                self.varint((UUID_BYTES as u64) << 1 | 1);
                self.out.put(&b);
            }
            None => self.str(s),
        }
    }

    fn time(&mut self, t: Time) {
        let now = (t.timestamp(), i64::from(t.timestamp_subsec_nanos()));
        // Seconds are within chrono's ±262,000 years, so the difference fits.
        self.signed(now.0 - self.prev.0);
        self.signed(now.1 - self.prev.1);
        self.prev = now;
    }

    fn shared(&mut self, s: &SharedStr) {
        let r = self.reference(|t| t.str_ref(s));
        self.varint(r);
        if r == 0 {
            self.str(s);
        }
    }

    fn scopes(&mut self, s: &Scopes) {
        let r = self.reference(|t| t.scopes_ref(s));
        self.varint(r);
        if r == 0 {
            self.varint(s.len() as u64);
            for scope in s.iter() {
                self.str(scope);
            }
        }
    }

    fn record(&mut self, rec: &Record) {
        let (c, ch) = (&rec.conn, &rec.chain);
        let mut flags = 0;
        let mut set = |bit: u8, on: bool| {
            if on {
                flags |= bit;
            }
        };
        set(flag::NEEDS_REAUTH, c.status == Status::NeedsReauth);
        set(flag::ACCOUNT, c.account_id.is_some());
        set(flag::LAST_REFRESH, c.last_refresh_at.is_some());
        set(flag::LAST_ERROR, c.last_error.is_some());
        set(flag::PREVIOUS, ch.previous.is_some());
        set(flag::ATTEMPT, ch.attempt_started_at.is_some());
        set(flag::ACCESS, ch.access.is_some());
        self.out.put(&[flags]);
        self.varint(ch.version);
        if let Some(a) = &ch.access {
            self.str(a.token.expose());
        }
        self.str(&c.id);
        self.str(&c.label);
        self.varint(c.sites.len() as u64);
        for s in &c.sites {
            self.cloud_id(&s.cloud_id);
            self.str(&s.url);
            self.str(&s.name);
            self.scopes(&s.scopes);
        }
        if let Some(a) = &ch.access {
            self.time(a.expires_at);
        }
        if let Some(t) = c.last_refresh_at {
            self.time(t);
        }
        for t in [
            ch.used_at,
            ch.rotated_at,
            c.consented_at,
            c.created_at,
            c.updated_at,
        ] {
            self.time(t);
        }
        if let Some(t) = ch.attempt_started_at {
            self.time(t);
        }
        if let Some(p) = &ch.previous {
            self.time(p.1);
        }
        if let Some(e) = &c.last_error {
            self.time(e.at);
        }
        for s in &c.sites {
            self.time(s.last_seen_at);
        }
        self.varint(u64::from(c.consecutive_failures));
        self.shared(&c.provider);
        self.shared(&c.client_id);
        self.scopes(&c.scopes);
        if let Some(a) = &c.account_id {
            self.str(a);
        }
        self.str(ch.refresh_token.expose());
        if let Some(p) = &ch.previous {
            self.str(p.0.expose());
        }
        if let Some(e) = &c.last_error {
            self.str(&e.code);
            self.str(&e.message);
        }
    }
}

/// Reads the layout of the module's doc. The bytes were written by [`Writer`] alone, so a
/// read past their end or a string that is not UTF-8 is a bug of this module, and panics.
#[derive(Clone)]
struct Reader<'a> {
    /// Where the shared values are numbered.
    tables: &'a Tables,
    /// What is left to read.
    rest: &'a [u8],
    /// The previous time read.
    prev: (i64, i64),
}

/// What a packing is made of, not what it holds: the message of the reader's panics.
const CORRUPT: &str = "a packed record is always well formed";

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], tables: &'a Tables) -> Reader<'a> {
        Reader {
            tables,
            rest: bytes,
            prev: (0, 0),
        }
    }

    fn byte(&mut self) -> u8 {
        let (&b, rest) = self.rest.split_first().expect(CORRUPT);
        self.rest = rest;
        b
    }

    fn varint(&mut self) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = self.byte();
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }

    fn signed(&mut self) -> i64 {
        let v = self.varint();
        ((v >> 1) as i64) ^ -((v & 1) as i64)
    }

    fn str(&mut self) -> &'a str {
        std::str::from_utf8(self.bytes()).expect(CORRUPT)
    }

    /// A string's bytes, not checked as UTF-8 (see [`utf8`]).
    fn bytes(&mut self) -> &'a [u8] {
        let (s, uuid) = self.coded();
        assert!(!uuid, "{CORRUPT}");
        s
    }

    /// A string's stored bytes, and whether they are a UUID's 16 (written by
    /// [`Writer::cloud_id`]).
    fn coded(&mut self) -> (&'a [u8], bool) {
        let v = self.varint();
        let (s, rest) = self.rest.split_at((v >> 1) as usize);
        self.rest = rest;
        (s, v & 1 == 1)
    }

    /// A cloud id (see [`Writer::cloud_id`]).
    fn cloud_id(&mut self) -> CloudId<'a> {
        match self.coded() {
            (b, true) => CloudId::Uuid(b.try_into().expect(CORRUPT)),
            (s, false) => CloudId::Text(std::str::from_utf8(s).expect(CORRUPT)),
        }
    }

    fn skip_str(&mut self) {
        self.coded();
    }

    /// The next time, as (seconds, nanoseconds), not yet made a [`Time`].
    fn raw_time(&mut self) -> (i64, i64) {
        let t = (self.prev.0 + self.signed(), self.prev.1 + self.signed());
        self.prev = t;
        t
    }

    fn time(&mut self) -> Time {
        to_time(self.raw_time())
    }

    fn shared(&mut self) -> SharedStr {
        match self.varint() {
            0 => SharedStr::new(self.str()),
            r => self.tables.str_of(r),
        }
    }

    fn scopes(&mut self) -> Scopes {
        match self.varint() {
            0 => {
                let n = self.varint() as usize;
                (0..n).map(|_| self.str().to_owned()).collect()
            }
            r => self.tables.scopes_of(r),
        }
    }

    fn skip_scopes(&mut self) {
        if self.varint() == 0 {
            for _ in 0..self.varint() {
                self.skip_str();
            }
        }
    }
}

/// A string read by [`Reader::bytes`], checked when it is wanted as a `str` (a head is read
/// for one or two of its fields: the others are not checked).
fn utf8(b: &[u8]) -> &str {
    std::str::from_utf8(b).expect(CORRUPT)
}

/// A time read back: exactly the one written (a leap second's nanoseconds included).
fn to_time((secs, nanos): (i64, i64)) -> Time {
    u32::try_from(nanos)
        .ok()
        .and_then(|n| Time::from_timestamp(secs, n))
        .expect(CORRUPT)
}

/// A record in one allocation: see the module's doc.
pub(crate) struct Packed {
    /// The fields, in the module's layout. Wiped on drop.
    bytes: Box<[u8]>,
}

impl From<&Record> for Packed {
    fn from(rec: &Record) -> Packed {
        Packed::with(rec, &TABLES)
    }
}

impl Packed {
    /// `rec` packed, its shared values numbered in `tables`.
    fn with(rec: &Record, tables: &Tables) -> Packed {
        let mut count = Count(0);
        let mut counting = Writer {
            out: &mut count,
            tables,
            refs: Refs::default(),
            prev: (0, 0),
        };
        counting.record(rec);
        let refs = Refs {
            replay: true,
            next: 0,
            ..counting.refs
        };
        let mut bytes = Vec::with_capacity(count.0);
        Writer {
            out: &mut bytes,
            tables,
            refs,
            prev: (0, 0),
        }
        .record(rec);
        // The numbers do not change between the two passes (they are the same ones, and
        // past the kept ones a table never forgets, and a full one stays full), so the count
        // is exact and the vector never grew: no copy of
        // a token was left behind by a reallocation.
        debug_assert_eq!(bytes.len(), count.0);
        Packed {
            bytes: bytes.into_boxed_slice(),
        }
    }
}

impl Drop for Packed {
    /// Wipes the bytes: the tokens are among them.
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.bytes.zeroize();
    }
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = self.head();
        f.debug_struct("Packed")
            .field("id", &utf8(head.id))
            .field("label", &utf8(head.label))
            .field("status", &self.status())
            .field("version", &head.version)
            .field("bytes", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

/// The front of a packing: what the token path and the planner read, without the rest.
struct Head<'a> {
    /// The flags byte.
    flags: u8,
    /// The chain version.
    version: u64,
    /// The access token, if any (bytes: see [`utf8`]).
    access_token: Option<&'a [u8]>,
    /// The connection id.
    id: &'a [u8],
    /// The label.
    label: &'a [u8],
    /// Where the sites begin (at their count).
    sites: Reader<'a>,
}

/// The times of a packing (the optional ones present as their flags say), as (seconds,
/// nanoseconds), and the reader after them.
struct Times<'a> {
    access_expires: Option<(i64, i64)>,
    last_refresh: Option<(i64, i64)>,
    used: (i64, i64),
    rotated: (i64, i64),
    consented: (i64, i64),
    created: (i64, i64),
    updated: (i64, i64),
    attempt: Option<(i64, i64)>,
    previous: Option<(i64, i64)>,
    error: Option<(i64, i64)>,
    /// How many sites there are.
    site_count: usize,
    /// Where the sites' last sights begin (after the other times).
    site_times: Reader<'a>,
    /// What follows the times.
    rest: Reader<'a>,
}

/// How many bytes a canonical UUID is stored in.
const UUID_BYTES: usize = 16;

/// How long a UUID's text is: `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
const UUID_TEXT: usize = 36;

/// Where a UUID's text has its dashes.
const UUID_DASHES: [usize; 4] = [8, 13, 18, 23];

/// The 16 bytes of `s` if it is a UUID in its canonical text (lowercase hex digits, dashes
/// at [`UUID_DASHES`]), as Atlassian's cloud ids are: stored in 16 bytes instead of 36 (about
/// 30 bytes a connection at the scale bench's 1.5 sites each). Anything else (uppercase
/// included, so that the text comes back exactly) is `None`.
fn uuid_bytes(s: &str) -> Option<[u8; UUID_BYTES]> {
    let t = s.as_bytes();
    if t.len() != UUID_TEXT {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut digits = [0u8; 2 * UUID_BYTES];
    let mut n = 0;
    for (i, &c) in t.iter().enumerate() {
        if UUID_DASHES.contains(&i) {
            if c != b'-' {
                return None;
            }
        } else {
            digits[n] = nibble(c)?;
            n += 1;
        }
    }
    let mut out = [0u8; UUID_BYTES];
    for (i, b) in out.iter_mut().enumerate() {
        *b = digits[2 * i] << 4 | digits[2 * i + 1];
    }
    Some(out)
}

/// A site's cloud id as a packing holds it: its text, or a canonical UUID's 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloudId<'a> {
    /// Stored as written.
    Text(&'a str),
    /// A canonical UUID ([`uuid_bytes`]).
    Uuid(&'a [u8; UUID_BYTES]),
}

impl CloudId<'_> {
    /// The UUID's text, on the stack.
    fn uuid_text(b: &[u8; UUID_BYTES]) -> [u8; UUID_TEXT] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b'-'; UUID_TEXT];
        let mut at = 0;
        for (i, &byte) in b.iter().enumerate() {
            // A dash before bytes 4, 6, 8 and 10.
            if matches!(i, 4 | 6 | 8 | 10) {
                at += 1;
            }
            out[at] = HEX[usize::from(byte >> 4)];
            out[at + 1] = HEX[usize::from(byte & 0xf)];
            at += 2;
        }
        out
    }

    /// Whether this is `other`, ASCII case ignored (as a `?site=` lookup compares).
    pub fn eq_ignore_ascii_case(&self, other: &str) -> bool {
        match self {
            CloudId::Text(s) => s.eq_ignore_ascii_case(other),
            CloudId::Uuid(b) => Self::uuid_text(b).eq_ignore_ascii_case(other.as_bytes()),
        }
    }
}

impl std::fmt::Display for CloudId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloudId::Text(s) => f.write_str(s),
            CloudId::Uuid(b) => {
                let text = Self::uuid_text(b);
                f.write_str(std::str::from_utf8(&text).expect("hex digits and dashes"))
            }
        }
    }
}

/// One site of a packing, borrowed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SiteView<'a> {
    /// See [`Site::cloud_id`].
    pub cloud_id: CloudId<'a>,
    /// See [`Site::url`].
    pub url: &'a str,
}

/// The sites of a packing, in order, borrowed ([`Packed::sites`]).
#[derive(Clone)]
pub(crate) struct Sites<'a> {
    /// Positioned at the next site.
    r: Reader<'a>,
    /// Sites left.
    left: u64,
}

impl<'a> Iterator for Sites<'a> {
    type Item = SiteView<'a>;
    fn next(&mut self) -> Option<SiteView<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let view = SiteView {
            cloud_id: self.r.cloud_id(),
            url: self.r.str(),
        };
        self.r.skip_str();
        self.r.skip_scopes();
        Some(view)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

impl ExactSizeIterator for Sites<'_> {}

impl Packed {
    fn head(&self) -> Head<'_> {
        self.head_with(&TABLES)
    }

    fn head_with<'a>(&'a self, tables: &'a Tables) -> Head<'a> {
        let mut r = Reader::new(&self.bytes, tables);
        let flags = r.byte();
        let version = r.varint();
        let access_token = (flags & flag::ACCESS != 0).then(|| r.bytes());
        let id = r.bytes();
        let label = r.bytes();
        Head {
            flags,
            version,
            access_token,
            id,
            label,
            sites: r,
        }
    }

    /// The reader at the times (past the sites), and how many sites there are.
    fn at_times<'a>(head: &Head<'a>) -> (Reader<'a>, usize) {
        let mut r = head.sites.clone();
        let n = r.varint() as usize;
        for _ in 0..n {
            r.skip_str();
            r.skip_str();
            r.skip_str();
            r.skip_scopes();
        }
        (r, n)
    }

    fn times(&self) -> (Head<'_>, Times<'_>) {
        self.times_with(&TABLES)
    }

    fn times_with<'a>(&'a self, tables: &'a Tables) -> (Head<'a>, Times<'a>) {
        let head = self.head_with(tables);
        let (mut r, site_count) = Packed::at_times(&head);
        let f = head.flags;
        let opt = |bit: u8, r: &mut Reader<'_>| (f & bit != 0).then(|| r.raw_time());
        let access_expires = opt(flag::ACCESS, &mut r);
        let last_refresh = opt(flag::LAST_REFRESH, &mut r);
        let used = r.raw_time();
        let rotated = r.raw_time();
        let consented = r.raw_time();
        let created = r.raw_time();
        let updated = r.raw_time();
        let attempt = opt(flag::ATTEMPT, &mut r);
        let previous = opt(flag::PREVIOUS, &mut r);
        let error = opt(flag::LAST_ERROR, &mut r);
        let site_times = r.clone();
        for _ in 0..site_count {
            r.raw_time();
        }
        let times = Times {
            access_expires,
            last_refresh,
            used,
            rotated,
            consented,
            created,
            updated,
            attempt,
            previous,
            error,
            site_count,
            site_times,
            rest: r,
        };
        (head, times)
    }

    /// The whole record, exactly as packed.
    pub fn to_record(&self) -> Record {
        self.to_record_with(&TABLES)
    }

    /// The whole record, its shared values numbered in `tables`.
    fn to_record_with(&self, tables: &Tables) -> Record {
        let (head, t) = self.times_with(tables);
        let f = head.flags;
        let mut r = t.rest;
        let consecutive_failures = u32::try_from(r.varint()).expect(CORRUPT);
        let provider = r.shared();
        let client_id = r.shared();
        let scopes = r.scopes();
        let account_id = (f & flag::ACCOUNT != 0).then(|| r.str().to_owned());
        let refresh_token = Secret::new(r.str().to_owned());
        let previous = t
            .previous
            .map(|at| Box::new((Secret::new(r.str().to_owned()), to_time(at))));
        let last_error = t.error.map(|at| {
            Box::new(LastError {
                code: r.str().to_owned(),
                message: r.str().to_owned(),
                at: to_time(at),
            })
        });
        let (mut strs, mut seen) = (head.sites.clone(), t.site_times);
        let n = strs.varint() as usize;
        debug_assert_eq!(n, t.site_count);
        let sites = (0..n)
            .map(|_| Site {
                cloud_id: strs.cloud_id().to_string().into(),
                url: strs.str().into(),
                name: strs.str().into(),
                scopes: strs.scopes(),
                last_seen_at: seen.time(),
            })
            .collect();
        Record {
            conn: Connection {
                id: utf8(head.id).to_owned(),
                label: utf8(head.label).to_owned(),
                provider,
                client_id,
                account_id,
                status: self.status(),
                scopes,
                sites,
                consented_at: to_time(t.consented),
                last_refresh_at: t.last_refresh.map(to_time),
                last_error,
                consecutive_failures,
                created_at: to_time(t.created),
                updated_at: to_time(t.updated),
            },
            chain: Chain {
                refresh_token,
                rotated_at: to_time(t.rotated),
                used_at: to_time(t.used),
                version: head.version,
                previous,
                attempt_started_at: t.attempt.map(to_time),
                access: head
                    .access_token
                    .zip(t.access_expires)
                    .map(|(tok, at)| AccessToken {
                        token: Secret::new(utf8(tok).to_owned()),
                        expires_at: to_time(at),
                    }),
            },
        }
    }

    /// The chain's status.
    pub fn status(&self) -> Status {
        if self.bytes[0] & flag::NEEDS_REAUTH != 0 {
            Status::NeedsReauth
        } else {
            Status::Active
        }
    }

    /// The chain version.
    pub fn version(&self) -> u64 {
        self.head().version
    }

    /// The connection id.
    pub fn id(&self) -> &str {
        utf8(self.head().id)
    }

    /// The label.
    pub fn label(&self) -> &str {
        utf8(self.head().label)
    }

    /// The access token and its expiry, if there is one.
    pub fn access(&self) -> Option<(&str, Time)> {
        let head = self.head();
        let token = utf8(head.access_token?);
        let (mut r, _) = Packed::at_times(&head);
        Some((token, r.time()))
    }

    /// The access token and its expiry, if any, and the last refresh: all the cached token
    /// path reads (the first two times: the rest is not decoded).
    pub fn access_and_refresh(&self) -> (Option<(&str, Time)>, Option<Time>) {
        let head = self.head();
        let (mut r, _) = Packed::at_times(&head);
        let access = head.access_token.map(|token| (utf8(token), r.time()));
        let refreshed = (head.flags & flag::LAST_REFRESH != 0).then(|| r.time());
        (access, refreshed)
    }

    /// The id, the refresh token's last use and the consent: what a scrape reads of every
    /// connection, in one pass.
    pub fn id_used_consented(&self) -> (&str, Time, Time) {
        let (head, t) = self.times();
        (utf8(head.id), to_time(t.used), to_time(t.consented))
    }

    /// What the planner and the token path need (see [`ChainFacts`]).
    pub fn facts(&self) -> ChainFacts<'_> {
        let (head, t) = self.times();
        ChainFacts {
            id: utf8(head.id),
            status: self.status(),
            used_at: to_time(t.used),
            marked: t.attempt.is_some(),
            access_expires_at: t.access_expires.map(to_time),
            last_refresh_at: t.last_refresh.map(to_time),
        }
    }

    /// When the refresh token was last used (the start of its inactivity expiry).
    pub fn used_at(&self) -> Time {
        to_time(self.times().1.used)
    }

    /// When consent was given (the start of the absolute expiry).
    pub fn consented_at(&self) -> Time {
        to_time(self.times().1.consented)
    }

    /// The attempt marker, if set.
    #[cfg(test)]
    pub fn attempt_started_at(&self) -> Option<Time> {
        self.times().1.attempt.map(to_time)
    }

    /// The reader positioned after the references (at the account).
    fn after_refs(&self) -> (u8, Reader<'_>) {
        let (head, t) = self.times();
        let mut r = t.rest;
        r.varint();
        for _ in 0..2 {
            if r.varint() == 0 {
                r.skip_str();
            }
        }
        r.skip_scopes();
        (head.flags, r)
    }

    /// The Atlassian account, if known.
    pub fn account_id(&self) -> Option<&str> {
        let (f, mut r) = self.after_refs();
        (f & flag::ACCOUNT != 0).then(|| r.str())
    }

    /// The OAuth client id.
    pub fn client_id(&self) -> SharedStr {
        let (_, t) = self.times();
        let mut r = t.rest;
        r.varint();
        if r.varint() == 0 {
            r.skip_str();
        }
        r.shared()
    }

    /// The refresh token.
    pub fn refresh_token(&self) -> &str {
        let (f, mut r) = self.after_refs();
        if f & flag::ACCOUNT != 0 {
            r.skip_str();
        }
        r.str()
    }

    /// The previous refresh token, if kept.
    pub fn previous_token(&self) -> Option<&str> {
        let (f, mut r) = self.after_refs();
        if f & flag::ACCOUNT != 0 {
            r.skip_str();
        }
        r.skip_str();
        (f & flag::PREVIOUS != 0).then(|| r.str())
    }

    /// The sites, borrowed, in order.
    pub fn sites(&self) -> Sites<'_> {
        let mut r = self.head().sites;
        let left = r.varint();
        Sites { r, left }
    }

    /// The heap bytes of the packing (its allocation).
    #[cfg(test)]
    pub fn heap_len(&self) -> usize {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(secs: i64, nanos: u32) -> Time {
        Time::from_timestamp(secs, nanos).unwrap()
    }

    /// Every field of `a` equals `b`'s (`Record` has no `PartialEq`: its secrets are not
    /// compared casually), and the shared values are the same shared values.
    fn assert_same(a: &Record, b: &Record) {
        let (x, y) = (&a.conn, &b.conn);
        assert_eq!(x.id, y.id);
        assert_eq!(x.label, y.label);
        assert_eq!(x.provider, y.provider);
        assert_eq!(x.client_id, y.client_id);
        assert_eq!(x.account_id, y.account_id);
        assert_eq!(x.status, y.status);
        assert_eq!(x.scopes, y.scopes);
        assert_eq!(x.sites, y.sites);
        assert_eq!(x.consented_at, y.consented_at);
        assert_eq!(x.last_refresh_at, y.last_refresh_at);
        assert_eq!(x.last_error, y.last_error);
        assert_eq!(x.consecutive_failures, y.consecutive_failures);
        assert_eq!(x.created_at, y.created_at);
        assert_eq!(x.updated_at, y.updated_at);
        let (x, y) = (&a.chain, &b.chain);
        assert_eq!(x.refresh_token.expose(), y.refresh_token.expose());
        assert_eq!(x.rotated_at, y.rotated_at);
        assert_eq!(x.used_at, y.used_at);
        assert_eq!(x.version, y.version);
        assert_eq!(
            x.previous.as_ref().map(|p| (p.0.expose(), p.1)),
            y.previous.as_ref().map(|p| (p.0.expose(), p.1))
        );
        assert_eq!(x.attempt_started_at, y.attempt_started_at);
        assert_eq!(
            x.access.as_ref().map(|a| (a.token.expose(), a.expires_at)),
            y.access.as_ref().map(|a| (a.token.expose(), a.expires_at))
        );
    }

    /// The accessors say what the record says.
    fn assert_accessors(p: &Packed, rec: &Record) {
        assert_eq!(p.id(), rec.conn.id);
        assert_eq!(p.label(), rec.conn.label);
        assert_eq!(p.status(), rec.conn.status);
        assert_eq!(p.version(), rec.chain.version);
        assert_eq!(
            p.access(),
            rec.chain
                .access
                .as_ref()
                .map(|a| (a.token.expose(), a.expires_at))
        );
        assert_eq!(p.account_id(), rec.conn.account_id.as_deref());
        assert_eq!(p.client_id(), rec.conn.client_id);
        assert_eq!(p.refresh_token(), rec.chain.refresh_token.expose());
        assert_eq!(
            p.previous_token(),
            rec.chain.previous.as_ref().map(|p| p.0.expose())
        );
        assert_eq!(p.used_at(), rec.chain.used_at);
        assert_eq!(
            p.access_and_refresh(),
            (
                rec.chain
                    .access
                    .as_ref()
                    .map(|a| (a.token.expose(), a.expires_at)),
                rec.conn.last_refresh_at
            )
        );
        assert_eq!(
            p.id_used_consented(),
            (
                rec.conn.id.as_str(),
                rec.chain.used_at,
                rec.conn.consented_at
            )
        );
        assert_eq!(p.consented_at(), rec.conn.consented_at);
        assert_eq!(p.attempt_started_at(), rec.chain.attempt_started_at);
        let facts = p.facts();
        let want = ChainFacts::of(rec);
        assert_eq!(
            (
                facts.id,
                facts.status,
                facts.used_at,
                facts.marked,
                facts.access_expires_at,
                facts.last_refresh_at
            ),
            (
                want.id,
                want.status,
                want.used_at,
                want.marked,
                want.access_expires_at,
                want.last_refresh_at
            )
        );
        let views: Vec<_> = p.sites().map(|s| (s.cloud_id.to_string(), s.url)).collect();
        let sites: Vec<_> = rec
            .conn
            .sites
            .iter()
            .map(|s| (s.cloud_id.to_string(), &*s.url))
            .collect();
        assert_eq!(views, sites);
        assert_eq!(p.sites().len(), rec.conn.sites.len());
        for (v, s) in p.sites().zip(&rec.conn.sites) {
            assert_eq!(crate::model::url_host(v.url), s.host());
        }
    }

    fn any_text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z0-9-]{1,40}",
            "\\PC{0,24}",
            "[a-zA-Z]{200,400}",
        ]
    }

    fn any_time() -> impl Strategy<Value = Time> {
        prop_oneof![
            (1_600_000_000i64..1_900_000_000, 0u32..1_000_000_000).prop_map(|(s, n)| at(s, n)),
            (
                -8_000_000_000_000i64..8_000_000_000_000,
                0u32..1_000_000_000
            )
                .prop_map(|(s, n)| at(s, n)),
            // A leap second's nanoseconds (only at a minute's last second).
            (0i64..1_000_000, 1_000_000_000u32..2_000_000_000)
                .prop_map(|(m, n)| at(m * 60 + 59, n)),
            Just(Time::MIN_UTC),
            Just(Time::MAX_UTC),
        ]
    }

    fn any_scopes() -> impl Strategy<Value = Scopes> {
        prop::collection::vec(any_text(), 0..4).prop_map(Scopes::from)
    }

    fn any_site() -> impl Strategy<Value = Site> {
        (any_text(), any_text(), any_text(), any_scopes(), any_time()).prop_map(
            |(cloud_id, url, name, scopes, last_seen_at)| Site {
                cloud_id: cloud_id.into(),
                url: format!("https://{url}").into(),
                name: name.into(),
                scopes,
                last_seen_at,
            },
        )
    }

    prop_compose! {
        fn any_conn()(
            id in any_text(), label in any_text(), provider in any_text(),
            client_id in any_text(), account_id in prop::option::of(any_text()),
            reauth in any::<bool>(), scopes in any_scopes(),
            sites in prop::collection::vec(any_site(), 0..6),
            consented_at in any_time(), last_refresh_at in prop::option::of(any_time()),
            last_error in prop::option::of((any_text(), any_text(), any_time())),
            consecutive_failures in any::<u32>(), created_at in any_time(), updated_at in any_time(),
        ) -> Connection {
            Connection {
                id, label, provider: provider.into(), client_id: client_id.into(), account_id,
                status: if reauth { Status::NeedsReauth } else { Status::Active },
                scopes, sites, consented_at, last_refresh_at,
                last_error: last_error
                    .map(|(code, message, at)| Box::new(LastError { code, message, at })),
                consecutive_failures, created_at, updated_at,
            }
        }
    }

    prop_compose! {
        fn any_chain()(
            refresh_token in any_text(), rotated_at in any_time(), used_at in any_time(),
            version in any::<u64>(), previous in prop::option::of((any_text(), any_time())),
            attempt_started_at in prop::option::of(any_time()),
            access in prop::option::of((any_text(), any_time())),
        ) -> Chain {
            Chain {
                refresh_token: Secret::new(refresh_token), rotated_at, used_at, version,
                previous: previous.map(|(t, at)| Box::new((Secret::new(t), at))),
                attempt_started_at,
                access: access.map(|(t, expires_at)| AccessToken {
                    token: Secret::new(t),
                    expires_at,
                }),
            }
        }
    }

    proptest! {
        /// Any record packs and unpacks to itself, every field, and the accessors read
        /// what it holds.
        #[test]
        fn any_record_round_trips(conn in any_conn(), chain in any_chain()) {
            let rec = Record { conn, chain };
            let packed = Packed::from(&rec);
            assert_same(&packed.to_record(), &rec);
            assert_accessors(&packed, &rec);
        }
    }

    proptest! {
        /// A canonical UUID cloud id is kept in 16 bytes and comes back as its text; any
        /// other 36-character text (an uppercase digit, a moved dash) is kept as text.
        #[test]
        fn uuid_cloud_ids_are_kept_in_16_bytes(bytes in any::<[u8; 16]>(), at in 0usize..36, upper in any::<bool>()) {
            let text = CloudId::Uuid(&bytes).to_string();
            prop_assert_eq!(text.len(), 36);
            prop_assert_eq!(uuid_bytes(&text), Some(bytes));
            let mut odd = text.clone().into_bytes();
            odd[at] = if upper { b'A' } else if odd[at] == b'-' { b'0' } else { b'-' };
            let odd = String::from_utf8(odd).unwrap();
            prop_assert_eq!(uuid_bytes(&odd), None, "{:?}", odd);
            prop_assert!(CloudId::Uuid(&bytes).eq_ignore_ascii_case(&text.to_ascii_uppercase()));
            prop_assert!(!CloudId::Uuid(&bytes).eq_ignore_ascii_case(&odd) || upper);

            let mut rec = crate::model::sample_record("c1", "l1", "rt", chrono::Utc::now());
            let site = |cloud_id: &str| Site {
                cloud_id: cloud_id.into(),
                url: "https://acme.atlassian.net".into(),
                name: "acme".into(),
                scopes: rec.conn.scopes.clone(),
                last_seen_at: rec.conn.created_at,
            };
            rec.conn.sites = vec![site(&text), site(&odd), site(&text[..35])];
            let packed = Packed::from(&rec);
            assert_same(&packed.to_record(), &rec);
            let views: Vec<String> = packed.sites().map(|s| s.cloud_id.to_string()).collect();
            prop_assert_eq!(views, [text.clone(), odd.clone(), text[..35].to_owned()]);
            prop_assert_eq!(packed.sites().next().map(|s| s.cloud_id), Some(CloudId::Uuid(&bytes)));
            let mut as_text = rec.clone();
            as_text.conn.sites = vec![site(&odd), site(&odd), site(&text[..35])];
            prop_assert_eq!(Packed::from(&as_text).heap_len(), packed.heap_len() + 20);
        }
    }

    /// A typical record (the scale bench's shape: a 32-digit id, 40-byte tokens, one
    /// site) costs its string bytes and a few dozen more in its one allocation, and the
    /// shared values come back as the same shared allocations.
    #[test]
    fn a_typical_record_costs_its_strings_and_a_few_dozen_bytes() {
        let now = at(1_780_000_000, 123_000_000);
        let mut rec = crate::model::sample_record(
            "0123456789abcdef0123456789abcdef",
            "scale-12345",
            &format!("rt-bench-{:031x}", 12345),
            now,
        );
        rec.conn.account_id = Some("scale-account-12345".into());
        rec.conn.last_refresh_at = Some(now);
        rec.chain.access = Some(AccessToken {
            token: Secret::new(format!("at-bench-{:031x}", 12345)),
            expires_at: now + chrono::Duration::hours(1),
        });
        rec.conn.sites = vec![Site {
            cloud_id: "0123456789abcdef-cloud-0000000012345".into(),
            url: "https://scale12345.atlassian.net".into(),
            name: "scale12345".into(),
            scopes: rec.conn.scopes.clone(),
            last_seen_at: now,
        }];
        let packed = Packed::from(&rec);
        let c = &rec.conn;
        let strings = c.id.len()
            + c.label.len()
            + c.account_id.as_ref().map_or(0, String::len)
            + rec.chain.refresh_token.expose().len()
            + rec
                .chain
                .access
                .as_ref()
                .map_or(0, |a| a.token.expose().len())
            + c.sites
                .iter()
                .map(|s| s.cloud_id.len() + s.url.len() + s.name.len())
                .sum::<usize>();
        let overhead = packed.heap_len() - strings;
        assert!(overhead <= 40, "{overhead} bytes beyond the strings");
        assert_eq!(std::mem::size_of::<Packed>(), 16);
        let back = packed.to_record();
        assert_same(&back, &rec);
        assert!(std::ptr::eq(
            back.conn.scopes.as_ptr(),
            rec.conn.scopes.as_ptr()
        ));
        assert!(std::ptr::eq(
            back.conn.client_id.as_ptr(),
            rec.conn.client_id.as_ptr()
        ));
    }

    /// Debug shows who the record is, never a token.
    #[test]
    fn debug_shows_no_token() {
        let now = at(1_780_000_000, 0);
        let mut rec = crate::model::sample_record("c1", "l1", "rt-very-secret", now);
        rec.chain.access = Some(AccessToken {
            token: Secret::new("at-very-secret"),
            expires_at: now,
        });
        rec.chain.previous = Some(Box::new((Secret::new("prev-very-secret"), now)));
        let printed = format!("{:?}", Packed::from(&rec));
        assert!(!printed.contains("very-secret"), "{printed}");
        assert!(
            printed.contains("c1") && printed.contains("l1"),
            "{printed}"
        );
    }

    /// Past the tables' bound a value is written out in full, and still round-trips
    /// (tables of their own, so that the process's are not filled for the other tests).
    #[test]
    fn values_past_the_tables_bound_are_written_out() {
        let now = at(1_780_000_000, 0);
        let tables = Tables {
            strs: Default::default(),
            scopes: Default::default(),
            max: 1,
        };
        let mut rec = crate::model::sample_record("c", "l", "rt", now);
        rec.conn.sites = vec![Site {
            cloud_id: "cloud".into(),
            url: "https://a.example".into(),
            name: "a".into(),
            scopes: Scopes::from(vec!["site-scope".to_owned(), String::new()]),
            last_seen_at: now,
        }];
        let packed = Packed::with(&rec, &tables);
        // The provider and the connection's scopes took the one number of each table.
        assert_eq!(tables.strs.read().items.len(), 1);
        assert_eq!(tables.scopes.read().items.len(), 1);
        assert_same(&packed.to_record_with(&tables), &rec);
        let views: Vec<_> = packed.sites().map(|s| s.cloud_id.to_string()).collect();
        assert_eq!(views, ["cloud"]);
        let full = Tables {
            strs: Default::default(),
            scopes: Default::default(),
            max: 0,
        };
        let inline = Packed::with(&rec, &full);
        assert_same(&inline.to_record_with(&full), &rec);
        assert!(inline.heap_len() > packed.heap_len());
    }
}
