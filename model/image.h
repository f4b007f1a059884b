/* image.h — decode PNG/JPEG into 8-bit RGB and turn it into the CLIP tower's
 * input exactly as the reference does (LLaVA's expand2square, then HF
 * CLIPImageProcessor on a PIL image: Pillow BICUBIC resize of the short side,
 * centre crop, rescale 1/255, normalise with the CLIP mean/std).
 *
 *     mm_image *img = NULL;
 *     char err[256];
 *     int rc = mm_image_decode(bytes, n, "image/png", 0, &img, err, sizeof err);
 *     if (rc != MM_OK) { log("%s: %s", mm_status_str(rc), err); return rc; }
 *     mm_image_params p;
 *     mm_image_params_default(&p, 336);          // pad to square, CLIP mean/std
 *     float *px = malloc(3 * 336 * 336 * sizeof *px);
 *     rc = mm_image_preprocess(img, &p, px, err, sizeof err);   // [3, 336, 336]
 *     mm_image_destroy(&img);
 *
 * Numerical contract: the pixels equal what Pillow 9.4 (the reference's PIL)
 * produces: decoding is byte-exact for PNG and for JPEG (same libjpeg-turbo,
 * same default settings); the resize reimplements Pillow's Resample.c (8-bit
 * fixed-point, two passes, clipping between them) and is byte-exact; the
 * floats are computed with the same float32 operations numpy does, so the
 * whole output equals tests/reference/image_ref.py bit for bit.
 *
 * Conversions to RGB follow PIL's Image.convert("RGB"): alpha is dropped (not
 * composited), grey is replicated, palettes are looked up, 1/2/4-bit grey is
 * scaled to 0..255, 16-bit samples keep their high byte. One deliberate
 * difference from raw PIL: PIL 9.4 clips 16-bit *greyscale* PNGs (mode I;16)
 * to 0..255, which turns most X-rays white; we (and image_ref.py) take the
 * high byte there too. CMYK/YCCK JPEGs are refused.
 *
 * Cost: decoding is linear in the file's pixels; mm_image_preprocess is
 * linear in input + output pixels whatever the aspect ratio (a 1 x 65535
 * strip padded to a 65535-wide square costs milliseconds, not the square's
 * 4.3 G pixels). To refuse an image before paying for its pixels, read its
 * size with mm_image_probe and check it against max_pixels and the memory
 * budget (3 bytes per decoded pixel):
 *
 *     size_t w, h;
 *     rc = mm_image_probe(bytes, n, "image/jpeg", &w, &h, err, sizeof err);
 *     if (rc == MM_OK && w * h > budget_pixels) ...   // w, h <= 2^31: no overflow
 *
 * Errors (returned status, detail in err):
 *   MM_EINVAL       NULL/empty buffer, bad parameters, image over max_pixels,
 *                   a side over MM_IMAGE_MAX_SIDE (checked before allocating)
 *   MM_EUNSUPPORTED neither PNG nor JPEG (err says what the bytes look like),
 *                   unknown media type, CMYK/YCCK JPEG
 *   MM_EPROTO       media type does not match the content; truncated or
 *                   corrupt data (libpng/libjpeg's message included); 0 x 0
 *   MM_ENOMEM       allocation failed
 *   MM_EIO / MM_ENOTFOUND  mm_image_load_file could not read the file
 *
 * Thread safety: no global state; each call is independent.
 */
#ifndef MM_IMAGE_H
#define MM_IMAGE_H

#include <stddef.h>
#include <stdint.h>

/* Largest accepted width or height: JPEG's own limit. Anything beyond is
 * treated as a hostile header, whatever max_pixels says. */
#define MM_IMAGE_MAX_SIDE 65535u
/* max_pixels == 0 means this: PIL's decompression-bomb warning threshold. */
#define MM_IMAGE_DEFAULT_MAX_PIXELS 89478485u
/* mm_image_load_file refuses files larger than this. */
#define MM_IMAGE_MAX_FILE_BYTES ((size_t)1 << 30)

/* A decoded image, owned by the caller (mm_image_destroy). */
typedef struct mm_image {
    size_t width;  /* pixels, >= 1 */
    size_t height; /* pixels, >= 1 */
    uint8_t *rgb;  /* [height, width, 3] row-major HWC, 8-bit R,G,B */
} mm_image;

/* How mm_image_preprocess turns an image into the tower's input. */
typedef struct mm_image_params {
    size_t size;        /* S: output is [3, S, S]; 336 for CLIP ViT-L/14-336 */
    int pad_to_square;  /* 1: expand2square with pad_rgb first (config's
                           image_aspect_ratio "pad"); 0: plain resize + crop */
    uint8_t pad_rgb[3]; /* pad colour: LLaVA's int(mean * 255) = 122,116,104 */
    float mean[3];      /* per-channel mean after rescaling to [0, 1] */
    float std[3];       /* per-channel std (divisor), all > 0 */
} mm_image_params;

/* A zeroed (black) width x height image. */
int mm_image_new(size_t width, size_t height, mm_image **out, char *err, size_t errlen);

/* Frees *img and sets *img = NULL; NULL or *img == NULL is fine. */
void mm_image_destroy(mm_image **img);

/* Decode a PNG or JPEG held in memory. media_type: "image/png", "image/jpeg"
 * ("image/jpg" accepted) or NULL to go by the magic bytes; when given it must
 * match the content. max_pixels: width*height limit, 0 = default; it and
 * MM_IMAGE_MAX_SIDE are checked against the header before the pixel buffer
 * (or libjpeg's whole-image buffers) is allocated. On success *out is a new
 * image owned by the caller; on failure *out is NULL. */
int mm_image_decode(const void *bytes, size_t n, const char *media_type, size_t max_pixels,
                    mm_image **out, char *err, size_t errlen);

/* Reads only the header (libpng's png_read_info: signature, IHDR and its CRC,
 * chunks up to the first IDAT; libjpeg's jpeg_read_header) and reports the
 * full-size dimensions in *width, *height, allocating no pixel memory. The
 * same format/media-type checks as mm_image_decode; CMYK/YCCK JPEGs are
 * refused (MM_EUNSUPPORTED) as decoding would. No limit is applied: the
 * sides may exceed MM_IMAGE_MAX_SIDE (PNG allows up to 2^31 - 1) so the
 * caller can say which limit an image breaks; decoding would refuse those.
 * MM_OK does not promise the pixel data decodes. On failure both are 0. */
int mm_image_probe(const void *bytes, size_t len, const char *media_type, size_t *width,
                   size_t *height, char *err, size_t errlen);

/* mm_image_decode, with opt-in JPEG downscaling during decoding for a
 * consumer that will resize to target_side (the preprocessing size S).
 * target_side == 0: exactly mm_image_decode. target_side > 0 and a JPEG:
 * libjpeg's DCT-domain scaling by the smallest factor 1/8, 1/4 or 1/2 that
 * keeps the decoded short side >= 2 * target_side (so the bicubic resize that
 * follows still reduces by >= 2x, whether or not the image is padded to
 * square); a JPEG too small for 1/2 decodes at full size. PNGs always decode
 * at full size (libpng cannot scale). max_pixels applies to the full size.
 *
 * Trade-off: a 4000 x 3000 photo decodes as 1000 x 750: 1/16 of the
 * memory, a decode 1.4-2x faster (entropy decoding still reads every
 * coefficient) and a resize 10-20x faster. But the result is no longer the
 * reference's: PIL decodes full size, and DCT-domain scaling is a different
 * low-pass filter than Pillow's antialiased bicubic. After preprocessing to
 * 336 the pixels differ by a fraction of an 8-bit step on average and by a
 * few steps at sharp edges (tests/test_image.c, test_jpeg_scaled_decode,
 * bounds mean 0.6 and max 6 steps). Use it where throughput and memory
 * matter more than bit-exactness with the reference; the default (0) keeps
 * the numerical contract above. */
int mm_image_decode_for(const void *bytes, size_t len, const char *media_type, size_t max_pixels,
                        size_t target_side, mm_image **out, char *err, size_t errlen);

/* The bytes of a whole file (at most MM_IMAGE_MAX_FILE_BYTES), malloc'd:
 * MM_ENOTFOUND when it does not exist, MM_EIO, MM_EINVAL (too large),
 * MM_ENOMEM; the message names the path. */
int mm_image_read_file(const char *path, uint8_t **out, size_t *len, char *err, size_t errlen);

/* Read a whole file and decode it (format from the magic bytes). */
int mm_image_load_file(const char *path, size_t max_pixels, mm_image **out, char *err,
                       size_t errlen);

/* CLIP defaults for size S: pad on, pad colour (122,116,104), CLIP mean/std. */
void mm_image_params_default(mm_image_params *p, size_t size);

/* Pillow's Image.resize(size, Image.BICUBIC) on an RGB image, byte-exact.
 * New image in *out (caller owns). Exposed for tests and other tools. */
int mm_image_resize_bicubic(const mm_image *img, size_t width, size_t height, mm_image **out,
                            char *err, size_t errlen);

/* img -> out[3][S][S] (CHW, float32): optional expand2square, resize so the
 * short side is S (long side int(S * long / short), as HF computes it),
 * centre crop S x S with top = (h - S) // 2, rescale 1/255, normalise.
 * The padded square is never materialised and its pad is never iterated:
 * each output samples the virtual canvas, the pad's share of a filter sum is
 * pad colour * (sum of the weights on pad), computed once per output row and
 * column. Time is O(w * h + S * S) filter taps plus O(max(w, h)) for the
 * weights; memory O(S * (S + h)) bytes. Bit-identical to materialising the
 * canvas. */
int mm_image_preprocess(const mm_image *img, const mm_image_params *p, float *out, char *err,
                        size_t errlen);

#endif
