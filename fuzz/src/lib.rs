//! Shared pieces of the fuzz targets: the properties they check ([`checks`], also used by the
//! root package's `tests/properties.rs`) and the structured inputs.

pub mod checks;

use arbitrary::Arbitrary;

/// A multipart field name: mostly the ones the view reads, sometimes anything.
#[derive(Arbitrary, Debug)]
pub enum FieldName {
    Model,
    Prompt,
    User,
    N,
    Size,
    Quality,
    Stream,
    File,
    Other(String),
}

impl FieldName {
    fn render(self) -> String {
        match self {
            FieldName::Model => "model".into(),
            FieldName::Prompt => "prompt".into(),
            FieldName::User => "user".into(),
            FieldName::N => "n".into(),
            FieldName::Size => "size".into(),
            FieldName::Quality => "quality".into(),
            FieldName::Stream => "stream".into(),
            FieldName::File => "file".into(),
            FieldName::Other(s) => s,
        }
    }
}

/// Field data: a plausible value or arbitrary bytes.
#[derive(Arbitrary, Debug)]
pub enum FieldData {
    Model(u8),
    Number(u32),
    Text(String),
    Bytes(Vec<u8>),
}

const MODELS: &[&str] = &[
    "whisper-1",
    "gpt-4o-transcribe",
    "dall-e-2",
    "gpt-image-1",
    "GPT-4o-2024-08-06",
    "openai/gpt-4o-mini",
    "my-gpt4o",
    " gpt4 ",
    "",
];

#[derive(Arbitrary, Debug)]
pub struct ArbField {
    name: FieldName,
    filename: Option<String>,
    content_type: Option<u8>,
    data: FieldData,
}

/// A structured multipart input.
#[derive(Arbitrary, Debug)]
pub struct ArbForm {
    boundary: u8,
    path: u8,
    fields: Vec<ArbField>,
    bare_lf: bool,
    unclosed: bool,
    preamble: Vec<u8>,
    epilogue: Vec<u8>,
    pub aliases: bool,
}

impl ArbForm {
    /// The form the checks take.
    pub fn into_form(self) -> checks::Form {
        checks::Form {
            boundary: self.boundary as usize,
            path: self.path as usize,
            fields: self
                .fields
                .into_iter()
                .map(|f| checks::FormField {
                    name: f.name.render(),
                    filename: f.filename,
                    content_type: f.content_type.map(|c| {
                        match c % 4 {
                            0 => "text/plain",
                            1 => "application/octet-stream",
                            2 => "audio/wav",
                            _ => "text/plain; charset=iso-8859-1",
                        }
                        .to_owned()
                    }),
                    data: match f.data {
                        FieldData::Model(i) => MODELS[i as usize % MODELS.len()].into(),
                        FieldData::Number(n) => n.to_string().into_bytes(),
                        FieldData::Text(s) => s.into_bytes(),
                        FieldData::Bytes(b) => b,
                    },
                })
                .collect(),
            bare_lf: self.bare_lf,
            unclosed: self.unclosed,
            preamble: self.preamble,
            epilogue: self.epilogue,
        }
    }
}
