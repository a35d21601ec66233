//! GLB validation: the model parsed for real (`gltf`), its triangles counted from every mesh
//! primitive's accessors, its textures' images measured from their PNG or JPEG headers.

use base64::Engine;
use gltf::mesh::Mode;
use kiln_schemas::dashboard::ValidationReport;

/// Validates a GLB against the job's limits. Never fails: what is wrong is in `problems`, and
/// `valid` is whether there are none.
pub fn validate(bytes: &[u8], max_faces: u32, max_texture_size: u32) -> ValidationReport {
    let mut r = ValidationReport {
        max_faces,
        ..Default::default()
    };
    if bytes.get(..4) != Some(b"glTF") {
        r.problems
            .push("the file is not a GLB (no glTF magic)".into());
        return r;
    }
    let g = match gltf::Gltf::from_slice(bytes) {
        Ok(g) => g,
        Err(e) => {
            r.problems.push(format!("the GLB does not parse: {e}"));
            return r;
        }
    };
    let blob = g.blob.as_deref();
    let data = |b: gltf::Buffer<'_>| match b.source() {
        gltf::buffer::Source::Bin => blob,
        gltf::buffer::Source::Uri(_) => None,
    };

    for mesh in g.document.meshes() {
        r.meshes += 1;
        for (i, p) in mesh.primitives().enumerate() {
            let name = format!("mesh {} primitive {i}", mesh.index());
            let reader = p.reader(data);
            let Some(positions) = reader.read_positions() else {
                r.problems.push(format!("{name} has no readable positions"));
                continue;
            };
            let vertices = positions.count() as u64;
            let n = match reader.read_indices() {
                Some(ix) => ix.into_u32().count() as u64,
                None if p.indices().is_some() => {
                    r.problems.push(format!("{name}'s indices cannot be read"));
                    continue;
                }
                None => vertices,
            };
            r.triangles += match p.mode() {
                Mode::Triangles => n / 3,
                Mode::TriangleStrip | Mode::TriangleFan => n.saturating_sub(2),
                _ => 0,
            };
        }
    }
    if r.meshes == 0 {
        r.problems.push("the model has no meshes".into());
    } else if r.triangles == 0 {
        r.problems.push("the model has no triangles".into());
    }
    if r.triangles > u64::from(max_faces) {
        r.problems.push(format!(
            "{} triangles, over the limit of {max_faces}",
            r.triangles
        ));
    }

    r.textures = g.document.textures().count() as u32;
    if r.textures == 0 {
        r.problems.push("the model has no textures".into());
    }
    for image in g.document.images() {
        let i = image.index();
        let bytes: Vec<u8> = match image.source() {
            gltf::image::Source::View { view, .. } => {
                let Some(b) = data(view.buffer())
                    .and_then(|b| b.get(view.offset()..view.offset() + view.length()))
                else {
                    r.problems.push(format!("image {i}'s data is missing"));
                    continue;
                };
                b.to_vec()
            }
            gltf::image::Source::Uri { uri, .. } => match data_uri(uri) {
                Some(b) => b,
                None => {
                    r.problems
                        .push(format!("image {i} refers to a file outside the GLB"));
                    continue;
                }
            },
        };
        let Some((w, h)) = image_size(&bytes) else {
            r.problems.push(format!(
                "image {i} is neither a PNG nor a JPEG that can be read"
            ));
            continue;
        };
        r.images.push([w, h]);
        if w == 0 || h == 0 {
            r.problems.push(format!("image {i} is empty ({w}×{h})"));
        } else if !w.is_power_of_two() || !h.is_power_of_two() {
            r.problems
                .push(format!("image {i} is {w}×{h}: sides must be powers of two"));
        }
        if w > max_texture_size || h > max_texture_size {
            r.problems.push(format!(
                "image {i} is {w}×{h}, over the largest side of {max_texture_size}"
            ));
        }
    }
    r.valid = r.problems.is_empty();
    r
}

/// A `data:` URI's bytes (base64 only).
fn data_uri(uri: &str) -> Option<Vec<u8>> {
    let rest = uri.strip_prefix("data:")?;
    let (meta, payload) = rest.split_once(',')?;
    if !meta.ends_with(";base64") {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(payload)
        .ok()
}

/// Width and height from a PNG's IHDR or a JPEG's first SOF marker.
pub fn image_size(b: &[u8]) -> Option<(u32, u32)> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        if b.get(12..16)? != b"IHDR" {
            return None;
        }
        let w = u32::from_be_bytes(b.get(16..20)?.try_into().ok()?);
        let h = u32::from_be_bytes(b.get(20..24)?.try_into().ok()?);
        return Some((w, h));
    }
    if b.starts_with(&[0xFF, 0xD8]) {
        let mut i = 2;
        loop {
            while *b.get(i)? != 0xFF {
                i += 1;
            }
            while *b.get(i)? == 0xFF {
                i += 1;
            }
            let marker = *b.get(i)?;
            i += 1;
            if marker == 0xD8 || marker == 0x01 || (0xD0..=0xD7).contains(&marker) {
                continue;
            }
            if marker == 0xD9 || marker == 0xDA {
                return None;
            }
            let len = u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]) as usize;
            if (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
                let h = u16::from_be_bytes([*b.get(i + 3)?, *b.get(i + 4)?]);
                let w = u16::from_be_bytes([*b.get(i + 5)?, *b.get(i + 6)?]);
                return Some((u32::from(w), u32::from(h)));
            }
            i += len;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_headers_are_measured() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend(256u32.to_be_bytes());
        png.extend(128u32.to_be_bytes());
        assert_eq!(image_size(&png), Some((256, 128)));
        // SOI, an APP0 segment, SOF0 with height 60 and width 100.
        let jpeg = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x00, 0x00, 0xFF, 0xC0, 0x00, 0x0B, 0x08, 0x00,
            0x3C, 0x00, 0x64,
        ];
        assert_eq!(image_size(&jpeg), Some((100, 60)));
        assert_eq!(image_size(b"GIF89a"), None);
        assert_eq!(image_size(&png[..18]), None);
    }

    #[test]
    fn what_is_not_a_glb_is_reported() {
        let r = validate(b"not a model", 10, 10);
        assert!(!r.valid && r.problems[0].contains("not a GLB"));
        let r = validate(b"glTF\x02\0\0\0\x0c\0\0\0", 10, 10);
        assert!(!r.valid, "{r:?}");
    }
}
