/* image.c — PNG/JPEG decoding (libpng, libjpeg-turbo) and CLIP preprocessing
 * that reproduces Pillow + HF CLIPImageProcessor bit for bit. See image.h.
 *
 * Why one file of ~960 lines: about a third is the libpng/libjpeg glue
 * (error longjmps, header probes), the rest is Pillow's resample with the
 * virtual pad; the limits (sides, pixels, file size) are checked the same
 * way on every path, which is easiest to see with the paths side by side. */
#include "image.h"

#include "dicom.h"
#include "status.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jerror.h>
#include <jpeglib.h>
#include <png.h>

/* ------------------------------------------------------------------------ */
/* Image objects                                                            */
/* ------------------------------------------------------------------------ */

/* Checks the geometry against the limits before anything is allocated. The
 * pixel product is formed only after both sides are known to be <= 65535, so
 * it cannot overflow. */
static int s_check_dims(size_t w, size_t h, size_t max_pixels, const char *what, char *err,
                        size_t errlen) {
    if (max_pixels == 0)
        max_pixels = MM_IMAGE_DEFAULT_MAX_PIXELS;
    if (w == 0 || h == 0)
        return mm_errorf(err, errlen, MM_EPROTO, "%s: empty image (%zu x %zu pixels)", what, w, h);
    if (w > MM_IMAGE_MAX_SIDE || h > MM_IMAGE_MAX_SIDE)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "%s: absurd dimensions %zu x %zu (each side must be <= %u)", what, w, h,
                         MM_IMAGE_MAX_SIDE);
    if (w * h > max_pixels)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "%s: %zu x %zu = %zu pixels exceeds the pixel limit of %zu", what, w, h,
                         w * h, max_pixels);
    return MM_OK;
}

int mm_image_new(size_t width, size_t height, mm_image **out, char *err, size_t errlen) {
    if (!out)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_image_new: out is NULL");
    *out = NULL;
    size_t px, bytes;
    if (width == 0 || height == 0 || !mm_size_mul(width, height, &px) ||
        !mm_size_mul(px, 3, &bytes))
        return mm_errorf(err, errlen, MM_EINVAL, "mm_image_new: bad size %zu x %zu", width, height);
    mm_image *img = calloc(1, sizeof *img);
    uint8_t *rgb = calloc(bytes, 1);
    if (!img || !rgb) {
        free(img);
        free(rgb);
        return mm_errorf(err, errlen, MM_ENOMEM, "mm_image_new: cannot allocate %zu x %zu RGB",
                         width, height);
    }
    img->width = width;
    img->height = height;
    img->rgb = rgb;
    *out = img;
    return MM_OK;
}

void mm_image_destroy(mm_image **img) {
    if (!img || !*img)
        return;
    free((*img)->rgb);
    free(*img);
    *img = NULL;
}

/* ------------------------------------------------------------------------ */
/* Format sniffing                                                          */
/* ------------------------------------------------------------------------ */

typedef enum { S_FMT_UNKNOWN, S_FMT_PNG, S_FMT_JPEG, S_FMT_DICOM } s_format;

static const uint8_t S_PNG_MAGIC[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

static s_format s_sniff(const uint8_t *b, size_t n) {
    if (n >= 8 && memcmp(b, S_PNG_MAGIC, 8) == 0)
        return S_FMT_PNG;
    if (n >= 3 && b[0] == 0xff && b[1] == 0xd8 && b[2] == 0xff)
        return S_FMT_JPEG;
    return S_FMT_UNKNOWN;
}

/* Names a few formats people actually send, so the error says "this is a
 * GIF" rather than only showing hex. */
static const char *s_guess_other(const uint8_t *b, size_t n) {
    if (n >= 6 && (memcmp(b, "GIF87a", 6) == 0 || memcmp(b, "GIF89a", 6) == 0))
        return "GIF";
    if (n >= 2 && b[0] == 'B' && b[1] == 'M')
        return "BMP";
    if (n >= 4 && (memcmp(b, "II*\0", 4) == 0 || memcmp(b, "MM\0*", 4) == 0))
        return "TIFF";
    if (n >= 12 && memcmp(b, "RIFF", 4) == 0 && memcmp(b + 8, "WEBP", 4) == 0)
        return "WebP";
    if (n >= 132 && memcmp(b + 128, "DICM", 4) == 0)
        return "DICOM";
    if (n >= 12 && memcmp(b + 4, "ftyp", 4) == 0)
        return "HEIF/AVIF/MP4 container";
    if (n >= 2 && b[0] == 0xff && b[1] == 0xd8)
        return "broken JPEG (SOI without a following marker)";
    if (n >= 4 && memcmp(b, S_PNG_MAGIC, 4) == 0)
        return "broken PNG signature";
    if (n >= 1 && (b[0] == '{' || b[0] == '<'))
        return "text (JSON/HTML/XML?)";
    return NULL;
}

/* "89 50 4e 47 ... ("PNG...")": up to 8 bytes in hex and as ASCII. */
static void s_describe_bytes(const uint8_t *b, size_t n, char *out, size_t outlen) {
    char hex[3 * 8 + 1] = "", asc[8 + 1] = "";
    size_t k = n < 8 ? n : 8;
    for (size_t i = 0; i < k; i++) {
        snprintf(hex + 3 * i, sizeof hex - 3 * i, "%02x%s", b[i], i + 1 < k ? " " : "");
        asc[i] = (b[i] >= 0x20 && b[i] < 0x7f) ? (char)b[i] : '.';
        asc[i + 1] = '\0';
    }
    const char *guess = s_guess_other(b, n);
    snprintf(out, outlen, "first bytes %s (\"%s\")%s%s", hex, asc, guess ? ", looks like " : "",
             guess ? guess : "");
}

/* ------------------------------------------------------------------------ */
/* PNG (libpng)                                                             */
/* ------------------------------------------------------------------------ */

/* Everything the libpng path owns lives here, not in locals, so that after a
 * longjmp out of libpng the cleanup sees the current pointers (locals changed
 * after setjmp would be indeterminate). */
typedef struct s_png_ctx {
    const uint8_t *data; /* the whole file */
    size_t n;            /* its length */
    size_t pos;          /* read cursor */
    png_structp png;
    png_infop info;
    int probe;       /* 1: stop after the header (mm_image_probe) */
    size_t w, h;     /* the header's dimensions, once read */
    mm_image *img;   /* result under construction */
    png_bytep *rows; /* [height] pointers into img->rgb, or into wide */
    uint8_t *wide;   /* [height, width, channels] when alpha must be dropped */
    char msg[160];   /* libpng's error text */
    int status;      /* status to return when we png_error ourselves */
    char *err;       /* caller's buffer */
    size_t errlen;
} s_png_ctx;

static void s_png_error(png_structp png, png_const_charp msg) {
    s_png_ctx *c = png_get_error_ptr(png);
    snprintf(c->msg, sizeof c->msg, "%s", msg);
    png_longjmp(png, 1);
}

static void s_png_warning(png_structp png, png_const_charp msg) {
    (void)png;
    (void)msg; /* ancillary-chunk trouble; PIL ignores it too */
}

static void s_png_read(png_structp png, png_bytep out, size_t len) {
    s_png_ctx *c = png_get_io_ptr(png);
    if (len > c->n - c->pos) {
        c->status = MM_EPROTO;
        png_error(png, "truncated PNG (data ends before the image does)");
    }
    memcpy(out, c->data + c->pos, len);
    c->pos += len;
}

/* Runs all libpng calls; returns MM_OK with c->img filled, or a status with
 * the error written. Never leaves allocations behind except in c (freed by
 * the caller). */
static int s_png_run(s_png_ctx *c, size_t max_pixels) {
    c->png = png_create_read_struct(PNG_LIBPNG_VER_STRING, c, s_png_error, s_png_warning);
    if (!c->png)
        return mm_errorf(c->err, c->errlen, MM_ENOMEM, "PNG: cannot create libpng reader");
    c->info = png_create_info_struct(c->png);
    if (!c->info)
        return mm_errorf(c->err, c->errlen, MM_ENOMEM, "PNG: cannot create libpng info");
    if (setjmp(png_jmpbuf(c->png))) {
        int st = c->status ? c->status : MM_EPROTO;
        return mm_errorf(c->err, c->errlen, st, "PNG: corrupt or truncated data: %s", c->msg);
    }
    png_set_read_fn(c->png, c, s_png_read);
    /* Our own side/pixel limits are stricter and give better messages; lift
     * libpng's default 1e6 limit so it does not pre-empt them. */
    png_set_user_limits(c->png, 0x7fffffffu, 0x7fffffffu);
    png_read_info(c->png, c->info);

    png_uint_32 w, h;
    int depth, ctype, interlace;
    png_get_IHDR(c->png, c->info, &w, &h, &depth, &ctype, &interlace, NULL, NULL);
    c->w = w;
    c->h = h;
    if (c->probe)
        return MM_OK;
    int rc = s_check_dims(w, h, max_pixels, "PNG", c->err, c->errlen);
    if (rc != MM_OK)
        return rc;

    /* PIL's convert("RGB"): 16-bit keeps the high byte (strip, not scale);
     * palettes and low-bit grey expand to 8-bit; grey is replicated; tRNS is
     * ignored (we never ask for tRNS_to_alpha); real alpha is dropped below. */
    if (depth == 16)
        png_set_strip_16(c->png);
    if (ctype == PNG_COLOR_TYPE_PALETTE)
        png_set_palette_to_rgb(c->png);
    if (ctype == PNG_COLOR_TYPE_GRAY && depth < 8)
        png_set_expand_gray_1_2_4_to_8(c->png);
    if (ctype == PNG_COLOR_TYPE_GRAY || ctype == PNG_COLOR_TYPE_GRAY_ALPHA)
        png_set_gray_to_rgb(c->png);
    png_set_interlace_handling(c->png);
    png_read_update_info(c->png, c->info);

    int channels = png_get_channels(c->png, c->info);
    if (png_get_bit_depth(c->png, c->info) != 8 || (channels != 3 && channels != 4))
        return mm_errorf(c->err, c->errlen, MM_EUNSUPPORTED,
                         "PNG: unexpected layout after conversion (%d channels, %d bits)", channels,
                         png_get_bit_depth(c->png, c->info));
    rc = mm_image_new(w, h, &c->img, c->err, c->errlen);
    if (rc != MM_OK)
        return rc;
    c->rows = malloc((size_t)h * sizeof *c->rows);
    if (!c->rows)
        return mm_errorf(c->err, c->errlen, MM_ENOMEM, "PNG: cannot allocate row table");
    uint8_t *base = c->img->rgb;
    if (channels == 4) { /* palette+tRNS expands to RGBA; decode wide, then drop A */
        size_t bytes = (size_t)w * h * 4;
        c->wide = malloc(bytes);
        if (!c->wide)
            return mm_errorf(c->err, c->errlen, MM_ENOMEM, "PNG: cannot allocate %zu bytes", bytes);
        base = c->wide;
    }
    for (png_uint_32 y = 0; y < h; y++)
        c->rows[y] = base + (size_t)y * w * (size_t)channels;
    png_read_image(c->png, c->rows);
    if (channels == 4) {
        size_t px = (size_t)w * h;
        for (size_t i = 0; i < px; i++)
            memcpy(c->img->rgb + 3 * i, c->wide + 4 * i, 3);
    }
    return MM_OK;
}

static int s_decode_png(const uint8_t *b, size_t n, size_t max_pixels, mm_image **out, char *err,
                        size_t errlen) {
    /* IHDR sits at a fixed place (right after the signature). Checking its
     * size here, before libpng runs, refuses a hostile header even when
     * nothing follows it (png_read_info reads on to the first IDAT). */
    if (n >= 24 && memcmp(b + 12, "IHDR", 4) == 0) {
        size_t w = (size_t)b[16] << 24 | (size_t)b[17] << 16 | (size_t)b[18] << 8 | b[19];
        size_t h = (size_t)b[20] << 24 | (size_t)b[21] << 16 | (size_t)b[22] << 8 | b[23];
        int rc = s_check_dims(w, h, max_pixels, "PNG", err, errlen);
        if (rc != MM_OK)
            return rc;
    }
    s_png_ctx c = {.data = b, .n = n, .err = err, .errlen = errlen};
    int rc = s_png_run(&c, max_pixels);
    png_destroy_read_struct(c.png ? &c.png : NULL, c.info ? &c.info : NULL, NULL);
    free(c.rows);
    free(c.wide);
    if (rc != MM_OK)
        mm_image_destroy(&c.img);
    *out = c.img;
    return rc;
}

/* The IHDR's dimensions through libpng's png_read_info (which validates the
 * header and its CRC); no pixel memory is allocated. */
static int s_probe_png(const uint8_t *b, size_t n, size_t *w, size_t *h, char *err, size_t errlen) {
    s_png_ctx c = {.data = b, .n = n, .probe = 1, .err = err, .errlen = errlen};
    int rc = s_png_run(&c, 0);
    png_destroy_read_struct(c.png ? &c.png : NULL, c.info ? &c.info : NULL, NULL);
    if (rc == MM_OK) {
        *w = c.w;
        *h = c.h;
    }
    return rc;
}

/* ------------------------------------------------------------------------ */
/* JPEG (libjpeg-turbo)                                                     */
/* ------------------------------------------------------------------------ */

typedef struct s_jpeg_err {
    struct jpeg_error_mgr pub; /* must be first: libjpeg casts to it */
    jmp_buf jump;
    char msg[JMSG_LENGTH_MAX];
} s_jpeg_err;

typedef struct s_jpeg_ctx {
    struct jpeg_decompress_struct cinfo;
    s_jpeg_err jerr;
    int created;        /* jpeg_create_decompress ran */
    int probe;          /* 1: stop after the header (mm_image_probe) */
    size_t target_side; /* > 0: DCT-domain downscale toward this (decode_for) */
    size_t w, h;        /* the header's (full-size) dimensions, once read */
    mm_image *img;      /* result under construction */
    char *err;
    size_t errlen;
} s_jpeg_ctx;

static void s_jpeg_error_exit(j_common_ptr cinfo) {
    s_jpeg_err *e = (s_jpeg_err *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, e->msg);
    longjmp(e->jump, 1);
}

/* Warnings (msg_level -1) about corrupt entropy data are tolerated, as PIL
 * does, except running out of data: a truncated upload must not turn into a
 * grey-filled image. */
static void s_jpeg_emit(j_common_ptr cinfo, int level) {
    if (level == -1 && cinfo->err->msg_code == JWRN_JPEG_EOF)
        s_jpeg_error_exit(cinfo);
}

static int s_jpeg_run(s_jpeg_ctx *c, const uint8_t *b, size_t n, size_t max_pixels) {
    c->cinfo.err = jpeg_std_error(&c->jerr.pub);
    c->jerr.pub.error_exit = s_jpeg_error_exit;
    c->jerr.pub.emit_message = s_jpeg_emit;
    if (setjmp(c->jerr.jump))
        return mm_errorf(c->err, c->errlen, MM_EPROTO, "JPEG: corrupt or truncated data: %s",
                         c->jerr.msg);
    jpeg_create_decompress(&c->cinfo);
    c->created = 1;
    jpeg_mem_src(&c->cinfo, b, (unsigned long)n);
    jpeg_read_header(&c->cinfo, TRUE);
    c->w = c->cinfo.image_width;
    c->h = c->cinfo.image_height;
    int rc = MM_OK;
    if (!c->probe) /* the limit applies to the full size, scaled decode or not */
        rc = s_check_dims(c->w, c->h, max_pixels, "JPEG", c->err, c->errlen);
    if (rc != MM_OK)
        return rc;
    switch (c->cinfo.jpeg_color_space) {
    case JCS_GRAYSCALE:
    case JCS_YCbCr:
    case JCS_RGB: break;
    case JCS_CMYK:
    case JCS_YCCK:
        return mm_errorf(c->err, c->errlen, MM_EUNSUPPORTED,
                         "JPEG: CMYK/YCCK colour space is not supported; convert the image to "
                         "RGB first");
    default:
        return mm_errorf(c->err, c->errlen, MM_EUNSUPPORTED,
                         "JPEG: unsupported colour space %d with %d components",
                         (int)c->cinfo.jpeg_color_space, c->cinfo.num_components);
    }
    if (c->probe)
        return MM_OK;
    /* libjpeg's defaults (ISLOW DCT, fancy upsampling, block smoothing) are
     * what PIL uses too; grey -> RGB replicates like PIL's convert. */
    c->cinfo.out_color_space = JCS_RGB;
    if (c->target_side > 0 && c->target_side <= MM_IMAGE_MAX_SIDE) {
        /* Opt-in DCT-domain downscale: the largest 1/d (d = 8, 4, 2) whose
         * output keeps the short side >= 2 * target_side, so the bicubic
         * resize that follows still has at least 2x oversampling. */
        size_t want = 2 * c->target_side;
        for (unsigned d = 8; d >= 2; d /= 2) {
            c->cinfo.scale_num = 1;
            c->cinfo.scale_denom = d;
            jpeg_calc_output_dimensions(&c->cinfo);
            size_t ow = c->cinfo.output_width, oh = c->cinfo.output_height;
            if ((ow < oh ? ow : oh) >= want)
                break;
            c->cinfo.scale_denom = 1;
        }
    }
    jpeg_start_decompress(&c->cinfo);
    if (c->cinfo.output_components != 3)
        return mm_errorf(c->err, c->errlen, MM_EUNSUPPORTED,
                         "JPEG: decoder produced %d components, expected 3",
                         c->cinfo.output_components);
    rc = mm_image_new(c->cinfo.output_width, c->cinfo.output_height, &c->img, c->err, c->errlen);
    if (rc != MM_OK)
        return rc;
    size_t stride = (size_t)c->cinfo.output_width * 3;
    while (c->cinfo.output_scanline < c->cinfo.output_height) {
        JSAMPROW row = c->img->rgb + (size_t)c->cinfo.output_scanline * stride;
        jpeg_read_scanlines(&c->cinfo, &row, 1);
    }
    jpeg_finish_decompress(&c->cinfo);
    return MM_OK;
}

/* probe != 0: header only, dimensions into *w, *h (out unused). */
static int s_decode_jpeg(const uint8_t *b, size_t n, size_t max_pixels, size_t target_side,
                         int probe, size_t *w, size_t *h, mm_image **out, char *err,
                         size_t errlen) {
    /* Heap, not stack: the context is ~1 KB plus libjpeg's jmp_buf, and it
     * must outlive the setjmp frame inside s_jpeg_run. */
    s_jpeg_ctx *c = calloc(1, sizeof *c);
    if (!c)
        return mm_errorf(err, errlen, MM_ENOMEM, "JPEG: cannot allocate decoder");
    c->err = err;
    c->errlen = errlen;
    c->probe = probe;
    c->target_side = target_side;
    if ((unsigned long)n != n) {
        free(c);
        return mm_errorf(err, errlen, MM_EINVAL, "JPEG: %zu bytes is too large", n);
    }
    int rc = s_jpeg_run(c, b, n, max_pixels);
    if (c->created)
        jpeg_destroy_decompress(&c->cinfo);
    if (rc != MM_OK)
        mm_image_destroy(&c->img);
    if (probe && rc == MM_OK) {
        *w = c->w;
        *h = c->h;
    }
    if (out)
        *out = c->img;
    free(c);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Public decoding                                                          */
/* ------------------------------------------------------------------------ */

/* Checks the buffer and the media type against the magic bytes; the format
 * in *fmt. */
static int s_format_of(const void *bytes, size_t n, const char *media_type, s_format *fmt,
                       char *err, size_t errlen) {
    if (!bytes || n == 0)
        return mm_errorf(err, errlen, MM_EINVAL, "image: empty buffer (0 bytes)");
    const uint8_t *b = bytes;
    /* DICOM (dicom.h): by its media type, or by "DICM" after the preamble */
    if (mm_dicom_is(bytes, n, media_type)) {
        *fmt = S_FMT_DICOM;
        return MM_OK;
    }
    *fmt = s_sniff(b, n);
    char what[160];
    if (*fmt == S_FMT_UNKNOWN) {
        s_describe_bytes(b, n, what, sizeof what);
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "image: neither PNG nor JPEG (%zu bytes, %s)", n, what);
    }
    if (media_type) {
        s_format want;
        if (strcmp(media_type, "image/png") == 0)
            want = S_FMT_PNG;
        else if (strcmp(media_type, "image/jpeg") == 0 || strcmp(media_type, "image/jpg") == 0)
            want = S_FMT_JPEG;
        else
            return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                             "image: unsupported media type \"%s\" (expected image/png, "
                             "image/jpeg or application/dicom)",
                             media_type);
        if (want != *fmt)
            return mm_errorf(err, errlen, MM_EPROTO,
                             "image: media type \"%s\" does not match the content, which is %s",
                             media_type, *fmt == S_FMT_PNG ? "PNG" : "JPEG");
    }
    return MM_OK;
}

int mm_image_probe(const void *bytes, size_t len, const char *media_type, size_t *width,
                   size_t *height, char *err, size_t errlen) {
    if (!width || !height)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_image_probe: width or height is NULL");
    *width = *height = 0;
    s_format fmt;
    int rc = s_format_of(bytes, len, media_type, &fmt, err, errlen);
    if (rc != MM_OK)
        return rc;
    if (fmt == S_FMT_DICOM) {
        mm_dicom_info info;
        if ((rc = mm_dicom_probe(bytes, len, &info, err, errlen)) == MM_OK) {
            *width = info.cols;
            *height = info.rows;
        }
        return rc;
    }
    if (fmt == S_FMT_PNG)
        return s_probe_png(bytes, len, width, height, err, errlen);
    return s_decode_jpeg(bytes, len, 0, 0, 1, width, height, NULL, err, errlen);
}

int mm_image_decode_for(const void *bytes, size_t n, const char *media_type, size_t max_pixels,
                        size_t target_side, mm_image **out, char *err, size_t errlen) {
    if (!out)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_image_decode_for: out is NULL");
    *out = NULL;
    s_format fmt;
    int rc = s_format_of(bytes, n, media_type, &fmt, err, errlen);
    if (rc != MM_OK)
        return rc;
    if (fmt == S_FMT_DICOM) /* the default window and frame; dicom.h for others */
        return mm_dicom_decode(bytes, n, NULL, max_pixels, out, err, errlen);
    return fmt == S_FMT_PNG
               ? s_decode_png(bytes, n, max_pixels, out, err, errlen)
               : s_decode_jpeg(bytes, n, max_pixels, target_side, 0, NULL, NULL, out, err, errlen);
}

int mm_image_decode(const void *bytes, size_t n, const char *media_type, size_t max_pixels,
                    mm_image **out, char *err, size_t errlen) {
    return mm_image_decode_for(bytes, n, media_type, max_pixels, 0, out, err, errlen);
}

int mm_image_read_file(const char *path, uint8_t **out, size_t *len, char *err, size_t errlen) {
    if (!out || !len || !path)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_image_read_file: NULL argument");
    *out = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return mm_errorf(err, errlen, errno == ENOENT ? MM_ENOTFOUND : MM_EIO, "%s: %s", path,
                         strerror(errno));
    uint8_t *buf = NULL;
    size_t n = 0, cap = 0;
    int rc = MM_OK;
    for (;;) {
        if (n == cap) {
            if (cap >= MM_IMAGE_MAX_FILE_BYTES) {
                rc = mm_errorf(err, errlen, MM_EINVAL, "%s: file larger than %zu bytes", path,
                               (size_t)MM_IMAGE_MAX_FILE_BYTES);
                break;
            }
            size_t ncap = cap ? cap * 2 : 65536;
            uint8_t *nb = realloc(buf, ncap);
            if (!nb) {
                rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: cannot allocate %zu bytes", path, ncap);
                break;
            }
            buf = nb;
            cap = ncap;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) {
            if (ferror(f))
                rc = mm_errorf(err, errlen, MM_EIO, "%s: read error", path);
            break;
        }
    }
    fclose(f);
    if (rc != MM_OK) {
        free(buf);
        return rc;
    }
    *out = buf;
    *len = n;
    return MM_OK;
}

int mm_image_load_file(const char *path, size_t max_pixels, mm_image **out, char *err,
                       size_t errlen) {
    if (!out || !path)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_image_load_file: NULL argument");
    *out = NULL;
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc = mm_image_read_file(path, &buf, &len, err, errlen);
    if (rc == MM_OK) {
        rc = mm_image_decode(buf, len, NULL, max_pixels, out, err, errlen);
        if (rc != MM_OK && err && errlen > 0) { /* prefix the path */
            char tmp[512];
            snprintf(tmp, sizeof tmp, "%s", err);
            snprintf(err, errlen, "%s: %s", path, tmp);
        }
    }
    free(buf);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Pillow's BICUBIC resample (libImaging/Resample.c, 8 bits per channel)    */
/* ------------------------------------------------------------------------ */

/* Pillow keeps 8-bit filter weights as fixed point with 22 fraction bits
 * (32 - 8 - 2) and rounds/clips to 0..255 after each pass. */
#define S_PRECISION_BITS 22

/* Keys' cubic with a = -0.5 (Pillow's bicubic_filter), support 2. */
static double s_bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0)
        x = -x;
    if (x < 1.0)
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0)
        return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* Filter weights for output indices [first, first + count) of a resize from
 * in_size to out_size, exactly as precompute_coeffs + normalize_coeffs_8bpc
 * compute them (same double arithmetic, same rounding). */
typedef struct s_coeffs {
    int ksize;   /* max taps per output */
    int *bounds; /* [count][2]: first input index, number of taps */
    int32_t *kk; /* [count][ksize] fixed-point weights */
} s_coeffs;

static void s_coeffs_free(s_coeffs *c) {
    free(c->bounds);
    free(c->kk);
    c->bounds = NULL;
    c->kk = NULL;
}

static int s_coeffs_make(s_coeffs *c, int in_size, int out_size, int first, int count) {
    /* Pillow passes the box edges as float; in0 = 0, in1 = in_size. */
    float in0 = 0.0f, in1 = (float)in_size;
    double scale = (double)(in1 - in0) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * filterscale;
    c->ksize = (int)ceil(support) * 2 + 1;
    c->bounds = malloc((size_t)count * 2 * sizeof *c->bounds);
    c->kk = malloc((size_t)count * (size_t)c->ksize * sizeof *c->kk);
    double *k = malloc((size_t)c->ksize * sizeof *k);
    if (!c->bounds || !c->kk || !k) {
        free(k);
        s_coeffs_free(c);
        return MM_ENOMEM;
    }
    for (int i = 0; i < count; i++) {
        int xx = first + i;
        double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0)
            xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size)
            xmax = in_size;
        xmax -= xmin;
        int x;
        for (x = 0; x < xmax; x++) {
            double w = s_bicubic((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (x = 0; x < xmax; x++)
            if (ww != 0.0)
                k[x] /= ww;
        for (; x < c->ksize; x++)
            k[x] = 0;
        int32_t *q = c->kk + (size_t)i * c->ksize;
        for (x = 0; x < c->ksize; x++)
            q[x] = k[x] < 0 ? (int32_t)(-0.5 + k[x] * (1 << S_PRECISION_BITS))
                            : (int32_t)(0.5 + k[x] * (1 << S_PRECISION_BITS));
        c->bounds[2 * i] = xmin;
        c->bounds[2 * i + 1] = xmax;
    }
    free(k);
    return MM_OK;
}

/* Pillow's clip8: round (the 1 << 21 bias was added up front), shift, clamp.
 * Accumulating in 64 bits gives the same values without signed overflow UB. */
static inline uint8_t s_clip8(int64_t ss) {
    if (ss < 0)
        return 0;
    ss >>= S_PRECISION_BITS;
    return ss > 255 ? 255 : (uint8_t)ss;
}

/* Identity "weights" for a pass Pillow skips (in size == out size): one tap
 * of weight 1.0. clip8(p << 22 + bias) == p, so running such a pass equals
 * skipping it, and one code path serves both. */
static int s_coeffs_identity(s_coeffs *c, int first, int count) {
    c->ksize = 1;
    c->bounds = malloc((size_t)count * 2 * sizeof *c->bounds);
    c->kk = malloc((size_t)count * sizeof *c->kk);
    if (!c->bounds || !c->kk) {
        s_coeffs_free(c);
        return MM_ENOMEM;
    }
    for (int i = 0; i < count; i++) {
        c->bounds[2 * i] = first + i;
        c->bounds[2 * i + 1] = 1;
        c->kk[i] = (int32_t)1 << S_PRECISION_BITS;
    }
    return MM_OK;
}

/* The (virtual) source of a resize: an image, optionally centred on a square
 * canvas of pad colour (LLaVA's expand2square) that is never materialised. */
typedef struct s_src {
    const mm_image *img; /* the real pixels */
    size_t vw, vh;       /* virtual size (the canvas) */
    size_t ox, oy;       /* where img's top-left lies on the canvas */
    uint8_t pad[3];      /* canvas colour */
} s_src;

/* For each of the count outputs of c: the sum of all its weights (*all) and
 * of those on taps outside the real span [r0, r1) (*outside, i.e. on pad);
 * and the first/last+1 output whose taps reach into the real span. */
static void s_coeffs_split(const s_coeffs *c, int count, size_t r0, size_t r1, int64_t *all,
                           int64_t *outside, int *first_real, int *end_real) {
    *first_real = count;
    *end_real = 0;
    for (int i = 0; i < count; i++) {
        size_t lo = (size_t)c->bounds[2 * i], n = (size_t)c->bounds[2 * i + 1];
        const int32_t *k = c->kk + (size_t)i * c->ksize;
        int64_t sa = 0, sr = 0;
        for (size_t t = 0; t < n; t++)
            sa += k[t];
        size_t a = lo > r0 ? lo : r0, b = lo + n < r1 ? lo + n : r1;
        for (size_t t = a; t < b; t++)
            sr += k[t - lo];
        all[i] = sa;
        outside[i] = sa - sr;
        if (a < b) {
            if (*first_real == count)
                *first_real = i;
            *end_real = i + 1;
        }
    }
    if (*first_real > *end_real)
        *first_real = *end_real = 0;
}

/* Writes the window [x0, x0+cw) x [y0, y0+ch) of Pillow's resize of the
 * source to out_w x out_h into dst ([ch, cw, 3]). Each output pixel depends
 * only on its own index, so computing a window (the centre crop) equals
 * cropping the full resize.
 *
 * Pillow's two passes (horizontal into an 8-bit intermediate, then
 * vertical), computed in integers, so any summation order gives the same
 * bits. The pad never enters a loop: a weight w on a pad tap adds w * pad,
 * so the pad taps of an output add pad * (their weight sum), which is
 * computed once per output column/row. In the intermediate, every pad row
 * and every column whose taps miss the real pixels holds the same value,
 * padout[column]; only the rectangle (real rows the vertical pass needs) x
 * (columns touching real pixels) is computed and stored. Work is
 * O(taps * (real pixels needed + cw * ch)) plus the weights themselves,
 * O(cw * ksize + ch * ksize) = O(virtual side): never the canvas's area. */
static int s_resample_window(const s_src *s, int out_w, int out_h, int x0, int y0, int cw, int ch,
                             uint8_t *dst, char *err, size_t errlen) {
    const int64_t bias = (int64_t)1 << (S_PRECISION_BITS - 1);
    int in_w = (int)s->vw, in_h = (int)s->vh;
    s_coeffs hc = {0}, vc = {0};
    int64_t *hall = NULL, *hout = NULL, *vall = NULL, *vout = NULL, *acc = NULL;
    uint8_t *padout = NULL, *tmp = NULL;
    int rc = MM_ENOMEM;

    /* Pillow skips a pass when that size does not change. */
    if ((out_w != in_w ? s_coeffs_make(&hc, in_w, out_w, x0, cw)
                       : s_coeffs_identity(&hc, x0, cw)) != MM_OK)
        goto done;
    if ((out_h != in_h ? s_coeffs_make(&vc, in_h, out_h, y0, ch)
                       : s_coeffs_identity(&vc, y0, ch)) != MM_OK)
        goto done;
    size_t rx0 = s->ox, rx1 = s->ox + s->img->width;  /* real columns on the canvas */
    size_t ry0 = s->oy, ry1 = s->oy + s->img->height; /* real rows on the canvas */
    hall = malloc((size_t)cw * sizeof *hall);
    hout = malloc((size_t)cw * sizeof *hout);
    vall = malloc((size_t)ch * sizeof *vall);
    vout = malloc((size_t)ch * sizeof *vout);
    padout = malloc((size_t)cw * 3);
    if (!hall || !hout || !vall || !vout || !padout)
        goto done;
    int xa, xb, ya, yb; /* outputs [xa, xb) / [ya, yb) have real taps */
    s_coeffs_split(&hc, cw, rx0, rx1, hall, hout, &xa, &xb);
    s_coeffs_split(&vc, ch, ry0, ry1, vall, vout, &ya, &yb);
    for (int i = 0; i < cw; i++)
        for (int c = 0; c < 3; c++)
            padout[3 * i + c] = s_clip8(bias + (int64_t)s->pad[c] * hall[i]);

    /* Real rows the vertical pass needs: [ra, rb). */
    size_t ra = ry1, rb = ry0;
    for (int j = ya; j < yb; j++) {
        size_t lo = (size_t)vc.bounds[2 * j], hi = lo + (size_t)vc.bounds[2 * j + 1];
        lo = lo > ry0 ? lo : ry0;
        hi = hi < ry1 ? hi : ry1;
        if (lo < hi) {
            ra = lo < ra ? lo : ra;
            rb = hi > rb ? hi : rb;
        }
    }
    size_t ncol = (size_t)(xb - xa), nrow = rb > ra ? rb - ra : 0, rowbytes, tmpbytes;
    if (!mm_size_mul(ncol, 3, &rowbytes) || !mm_size_mul(nrow, rowbytes, &tmpbytes))
        goto done;
    tmp = malloc(tmpbytes ? tmpbytes : 1);
    acc = malloc((rowbytes ? rowbytes : 1) * sizeof *acc);
    if (!tmp || !acc)
        goto done;

    /* Horizontal pass over the stored rectangle: real taps only, the pad
     * taps' share added in one product. */
    for (size_t r = 0; r < nrow; r++) {
        const uint8_t *in = s->img->rgb + (ra + r - ry0) * s->img->width * 3;
        uint8_t *o = tmp + r * rowbytes;
        for (int i = xa; i < xb; i++) {
            size_t lo = (size_t)hc.bounds[2 * i], n = (size_t)hc.bounds[2 * i + 1];
            const int32_t *k = hc.kk + (size_t)i * hc.ksize;
            size_t a = lo > rx0 ? lo : rx0, b = lo + n < rx1 ? lo + n : rx1;
            int64_t s0 = bias + (int64_t)s->pad[0] * hout[i];
            int64_t s1 = bias + (int64_t)s->pad[1] * hout[i];
            int64_t s2 = bias + (int64_t)s->pad[2] * hout[i];
            for (size_t t = a; t < b; t++) {
                const uint8_t *p = in + (t - rx0) * 3;
                int64_t w = k[t - lo];
                s0 += p[0] * w;
                s1 += p[1] * w;
                s2 += p[2] * w;
            }
            size_t q = (size_t)(i - xa) * 3;
            o[q + 0] = s_clip8(s0);
            o[q + 1] = s_clip8(s1);
            o[q + 2] = s_clip8(s2);
        }
    }

    /* Vertical pass. Columns outside [xa, xb) are padout all the way down;
     * inside, the pad rows' share is padout * (their weight sum). */
    for (int j = 0; j < ch; j++) {
        uint8_t *o = dst + (size_t)j * cw * 3;
        for (int i = 0; i < xa; i++)
            for (int c = 0; c < 3; c++)
                o[3 * i + c] = s_clip8(bias + (int64_t)padout[3 * i + c] * vall[j]);
        for (int i = xb; i < cw; i++)
            for (int c = 0; c < 3; c++)
                o[3 * i + c] = s_clip8(bias + (int64_t)padout[3 * i + c] * vall[j]);
        if (ncol == 0)
            continue;
        const uint8_t *pc = padout + (size_t)xa * 3;
        for (size_t q = 0; q < rowbytes; q++)
            acc[q] = bias + (int64_t)pc[q] * vout[j];
        size_t lo = (size_t)vc.bounds[2 * j], n = (size_t)vc.bounds[2 * j + 1];
        const int32_t *k = vc.kk + (size_t)j * vc.ksize;
        size_t a = lo > ra ? lo : ra, b = lo + n < rb ? lo + n : rb;
        for (size_t t = a; t < b; t++) {
            const uint8_t *row = tmp + (t - ra) * rowbytes;
            int64_t w = k[t - lo];
            for (size_t q = 0; q < rowbytes; q++)
                acc[q] += row[q] * w;
        }
        uint8_t *oc = o + (size_t)xa * 3;
        for (size_t q = 0; q < rowbytes; q++)
            oc[q] = s_clip8(acc[q]);
    }
    rc = MM_OK;
done:
    s_coeffs_free(&hc);
    s_coeffs_free(&vc);
    free(hall);
    free(hout);
    free(vall);
    free(vout);
    free(padout);
    free(tmp);
    free(acc);
    if (rc != MM_OK)
        mm_errorf(err, errlen, rc, "resize: out of memory (%dx%d -> %dx%d)", in_w, in_h, out_w,
                  out_h);
    return rc;
}

static void s_src_init(s_src *s, const mm_image *img, int pad, const uint8_t rgb[3]) {
    memset(s, 0, sizeof *s);
    s->img = img;
    s->vw = img->width;
    s->vh = img->height;
    if (pad && img->width != img->height) {
        /* expand2square: side max(w, h), paste at ((side-w)//2, (side-h)//2) */
        size_t side = img->width > img->height ? img->width : img->height;
        s->vw = s->vh = side;
        s->ox = (side - img->width) / 2;
        s->oy = (side - img->height) / 2;
    }
    memcpy(s->pad, rgb, 3);
}

static int s_check_image(const mm_image *img, const char *fn, char *err, size_t errlen) {
    if (!img || !img->rgb || img->width == 0 || img->height == 0 ||
        img->width > MM_IMAGE_MAX_SIDE || img->height > MM_IMAGE_MAX_SIDE)
        return mm_errorf(err, errlen, MM_EINVAL, "%s: invalid image (%zu x %zu)", fn,
                         img ? img->width : 0, img ? img->height : 0);
    return MM_OK;
}

int mm_image_resize_bicubic(const mm_image *img, size_t width, size_t height, mm_image **out,
                            char *err, size_t errlen) {
    if (!out)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_image_resize_bicubic: out is NULL");
    *out = NULL;
    int rc = s_check_image(img, "mm_image_resize_bicubic", err, errlen);
    if (rc != MM_OK)
        return rc;
    if (width == 0 || height == 0 || width > MM_IMAGE_MAX_SIDE || height > MM_IMAGE_MAX_SIDE)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_image_resize_bicubic: bad target %zu x %zu",
                         width, height);
    static const uint8_t black[3] = {0, 0, 0};
    s_src s;
    s_src_init(&s, img, 0, black);
    mm_image *o = NULL;
    rc = mm_image_new(width, height, &o, err, errlen);
    if (rc == MM_OK)
        rc = s_resample_window(&s, (int)width, (int)height, 0, 0, (int)width, (int)height, o->rgb,
                               err, errlen);
    if (rc != MM_OK)
        mm_image_destroy(&o);
    *out = o;
    return rc;
}

/* ------------------------------------------------------------------------ */
/* CLIP preprocessing                                                       */
/* ------------------------------------------------------------------------ */

void mm_image_params_default(mm_image_params *p, size_t size) {
    memset(p, 0, sizeof *p);
    p->size = size;
    p->pad_to_square = 1;
    /* HF builds np.array(mean, dtype=float32) from Python doubles: cast the
     * double literal (not a float literal) to get the same float32. */
    static const double mean[3] = {0.48145466, 0.4578275, 0.40821073};
    static const double std[3] = {0.26862954, 0.26130258, 0.27577711};
    for (int c = 0; c < 3; c++) {
        p->mean[c] = (float)mean[c];
        p->std[c] = (float)std[c];
        /* LLaVA: tuple(int(x * 255) for x in image_mean), i.e. truncation */
        p->pad_rgb[c] = (uint8_t)(int)(mean[c] * 255);
    }
}

int mm_image_preprocess(const mm_image *img, const mm_image_params *p, float *out, char *err,
                        size_t errlen) {
    int rc = s_check_image(img, "mm_image_preprocess", err, errlen);
    if (rc != MM_OK)
        return rc;
    if (!p || !out)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_image_preprocess: NULL params or output");
    size_t S = p->size;
    if (S == 0 || S > 4096)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "mm_image_preprocess: size %zu out of range 1..4096", S);
    for (int c = 0; c < 3; c++)
        if (!(p->std[c] > 0.0f) || !isfinite(p->mean[c]))
            return mm_errorf(err, errlen, MM_EINVAL,
                             "mm_image_preprocess: channel %d mean %g / std %g invalid", c,
                             (double)p->mean[c], (double)p->std[c]);

    s_src s;
    s_src_init(&s, img, p->pad_to_square, p->pad_rgb);
    /* HF get_resize_output_image_size(default_to_square=False): short side
     * S, long side int(S * long / short) — an exact integer product, one
     * correctly rounded division, truncation. */
    size_t w = s.vw, h = s.vh;
    size_t shrt = w <= h ? w : h, lng = w <= h ? h : w;
    size_t new_long = (size_t)((double)(S * lng) / (double)shrt);
    size_t rw = w <= h ? S : new_long, rh = w <= h ? new_long : S;
    /* HF center_crop: top = (h - S) // 2, left = (w - S) // 2 */
    size_t top = (rh - S) / 2, left = (rw - S) / 2;
    if (rw > INT_MAX || rh > INT_MAX)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_image_preprocess: resize %zu x %zu too big",
                         rw, rh);
    uint8_t *crop = malloc(S * S * 3); /* S <= 4096: no overflow */
    if (!crop)
        return mm_errorf(err, errlen, MM_ENOMEM, "mm_image_preprocess: out of memory");
    rc = s_resample_window(&s, (int)rw, (int)rh, (int)left, (int)top, (int)S, (int)S, crop, err,
                           errlen);
    if (rc != MM_OK) {
        free(crop);
        return rc;
    }
    /* HF rescale: uint8 * (1/255) in float64, cast to float32; normalize:
     * (x - mean) / std in float32. Same operations, same bits. */
    const double scale = 1.0 / 255.0;
    size_t plane = S * S;
    for (size_t i = 0; i < plane; i++)
        for (int c = 0; c < 3; c++) {
            float x = (float)((double)crop[3 * i + c] * scale);
            out[(size_t)c * plane + i] = (x - p->mean[c]) / p->std[c];
        }
    free(crop);
    return MM_OK;
}
