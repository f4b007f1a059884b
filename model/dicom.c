/* dicom.c — DICOM header interpretation and the display pipeline (modality
 * LUT, VOI LUT, photometric interpretations, frames) in C; GDCM parses and
 * decompresses behind dicom_gdcm.h. See dicom.h for the pipeline.
 *
 * One file (over 900 lines): the structure walk that guards GDCM, the
 * header reading and the pipeline share one parsed-header struct and the
 * walk's fragment table; split, that state would cross file boundaries. */
#include "dicom.h"

#include "dicom_gdcm.h"
#include "status.h"

#include <ctype.h>
#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

/* ------------------------------------------------------------------------ */
/* Tags                                                                     */
/* ------------------------------------------------------------------------ */

#define T_SOP_INSTANCE_UID 0x00080018u
#define T_MODALITY 0x00080060u
#define T_SAMPLES 0x00280002u
#define T_PHOTOMETRIC 0x00280004u
#define T_PLANAR 0x00280006u
#define T_FRAMES 0x00280008u
#define T_ROWS 0x00280010u
#define T_COLS 0x00280011u
#define T_BITS_ALLOCATED 0x00280100u
#define T_BITS_STORED 0x00280101u
#define T_HIGH_BIT 0x00280102u
#define T_PIXEL_REPR 0x00280103u
#define T_WINDOW_CENTER 0x00281050u
#define T_WINDOW_WIDTH 0x00281051u
#define T_RESCALE_INTERCEPT 0x00281052u
#define T_RESCALE_SLOPE 0x00281053u
#define T_VOI_FUNCTION 0x00281056u
#define T_PALETTE_DESC 0x00281101u /* red; green +1, blue +2 */
#define T_PALETTE_DATA 0x00281201u /* red; green +1, blue +2 */
#define T_SEG_PALETTE_DATA 0x00281221u
#define T_MODALITY_LUT_SEQ 0x00283000u
#define T_LUT_DESCRIPTOR 0x00283002u
#define T_LUT_DATA 0x00283006u
#define T_VOI_LUT_SEQ 0x00283010u
#define T_FLOAT_PIXEL_DATA 0x7fe00008u
#define T_DOUBLE_PIXEL_DATA 0x7fe00009u
#define T_PIXEL_DATA 0x7fe00010u

/* ------------------------------------------------------------------------ */
/* Options                                                                  */
/* ------------------------------------------------------------------------ */

static const struct {
    const char *name;
    double width, center; /* Hounsfield units; 0 width: not a fixed window */
} S_WINDOWS[] = {
    [MM_DICOM_WINDOW_AUTO] = {"auto", 0, 0},
    [MM_DICOM_WINDOW_FULL] = {"full", 0, 0},
    [MM_DICOM_WINDOW_LUNG] = {"lung", 1500, -600},
    [MM_DICOM_WINDOW_MEDIASTINUM] = {"mediastinum", 350, 50},
    [MM_DICOM_WINDOW_BONE] = {"bone", 1800, 400},
    [MM_DICOM_WINDOW_BRAIN] = {"brain", 80, 40},
};
#define S_N_WINDOWS (sizeof S_WINDOWS / sizeof S_WINDOWS[0])

void mm_dicom_options_default(mm_dicom_options *o) {
    memset(o, 0, sizeof *o);
    o->window = MM_DICOM_WINDOW_AUTO;
}

int mm_dicom_window_parse(const char *name, mm_dicom_window *out, char *err, size_t errlen) {
    if (!name || !*name) {
        *out = MM_DICOM_WINDOW_AUTO;
        return MM_OK;
    }
    for (size_t i = 0; i < S_N_WINDOWS; i++)
        if (strcmp(name, S_WINDOWS[i].name) == 0) {
            *out = (mm_dicom_window)i;
            return MM_OK;
        }
    return mm_errorf(err, errlen, MM_EINVAL,
                     "window '%.32s' is not a preset (auto, full, lung, mediastinum, bone, brain)",
                     name);
}

const char *mm_dicom_window_name(mm_dicom_window w) {
    return (unsigned)w < S_N_WINDOWS ? S_WINDOWS[w].name : "?";
}

/* ------------------------------------------------------------------------ */
/* Attribute access                                                         */
/* ------------------------------------------------------------------------ */

int mm_dicom_is(const void *bytes, size_t len, const char *media_type) {
    if (media_type && *media_type)
        return strcmp(media_type, "application/dicom") == 0;
    return bytes && len >= 132 && memcmp((const uint8_t *)bytes + 128, "DICM", 4) == 0;
}

/* A string value (CS, DS, IS, UI, ...), value number `index` (0-based) of a
 * backslash-separated list, spaces and NULs trimmed. 1 when present and
 * non-empty. */
static int s_str(const mm_gdcm_file *f, uint32_t seq, uint32_t tag, size_t index, char *buf,
                 size_t cap) {
    const uint8_t *d;
    size_t n;
    buf[0] = '\0';
    if (!mm_gdcm_value(f, seq, tag, &d, &n))
        return 0;
    size_t i = 0;
    for (size_t k = 0; k < index; k++) {
        while (i < n && d[i] != '\\')
            i++;
        if (i == n)
            return 0;
        i++;
    }
    size_t j = i;
    while (j < n && d[j] != '\\')
        j++;
    while (i < j && (d[i] == ' ' || d[i] == '\0'))
        i++;
    while (j > i && (d[j - 1] == ' ' || d[j - 1] == '\0'))
        j--;
    if (j - i >= cap)
        j = i + cap - 1;
    memcpy(buf, d + i, j - i);
    buf[j - i] = '\0';
    return buf[0] != '\0';
}

/* Code strings from the file go into messages and the audit: keep them to
 * printable ASCII so a hostile file cannot inject control characters or
 * invalid UTF-8. */
static void s_printable(char *s) {
    for (; *s; s++)
        if (*s < 0x20 || *s > 0x7e)
            *s = '?';
}

/* A decimal string (DS/IS) value; 1 when present, parsed and finite. */
static int s_num(const mm_gdcm_file *f, uint32_t seq, uint32_t tag, size_t index, double *v) {
    char b[72], *end;
    if (!s_str(f, seq, tag, index, b, sizeof b))
        return 0;
    double x = strtod(b, &end);
    if (end == b || *end || !isfinite(x))
        return 0;
    *v = x;
    return 1;
}

/* A US value (host order, see dicom_gdcm.h): 1 present, 0 absent, -1 wrong size. */
static int s_us(const mm_gdcm_file *f, uint32_t seq, uint32_t tag, size_t index, unsigned *v) {
    const uint8_t *d;
    size_t n;
    if (!mm_gdcm_value(f, seq, tag, &d, &n) || n == 0)
        return 0;
    if (n < 2 * (index + 1))
        return -1;
    *v = (unsigned)d[2 * index] | (unsigned)d[2 * index + 1] << 8;
    return 1;
}

/* ------------------------------------------------------------------------ */
/* Structure check                                                          */
/* ------------------------------------------------------------------------ */

/* Debian's GDCM is built with assert() on, and some malformed inputs (a
 * truncated meta group, an element running past the end) abort the process
 * inside it. So every byte buffer is walked here first: each element header
 * must be complete, each defined length must fit in what remains, items and
 * delimiters must nest (at most S_MAX_DEPTH deep), and the walk must end
 * exactly at the end of the buffer. Only what passes reaches GDCM. The walk
 * also records the encapsulated Pixel Data fragments (RLE is decoded here,
 * from them). Deflated data sets are checked up to their meta group only
 * (the rest is compressed; GDCM inflates it). */
#define S_MAX_DEPTH 16
#define S_UNDEFINED 0xffffffffu

typedef struct s_walk {
    const uint8_t *b; /* the whole buffer */
    size_t n;         /* its length */
    int explicit_vr;  /* data set encoding */
    int big;          /* big endian data set */
    char ts[68];      /* transfer syntax UID from the meta group ("" none) */
    size_t nfrag;     /* encapsulated Pixel Data items, offset table first */
    size_t *frag_off; /* [nfrag] byte offsets of the item values */
    size_t *frag_len; /* [nfrag] their lengths */
    char *err;
    size_t errlen;
} s_walk;

static uint16_t s_rd16(const s_walk *w, size_t p, int big) {
    return big ? (uint16_t)(w->b[p] << 8 | w->b[p + 1]) : (uint16_t)(w->b[p] | w->b[p + 1] << 8);
}
static uint32_t s_rd32(const s_walk *w, size_t p, int big) {
    return big ? (uint32_t)w->b[p] << 24 | (uint32_t)w->b[p + 1] << 16 |
                     (uint32_t)w->b[p + 2] << 8 | w->b[p + 3]
               : (uint32_t)w->b[p] | (uint32_t)w->b[p + 1] << 8 | (uint32_t)w->b[p + 2] << 16 |
                     (uint32_t)w->b[p + 3] << 24;
}

/* One of the VRs of PS3.5 6.2 (GDCM asserts on others in the meta group). */
static int s_known_vr(const uint8_t *vr) {
    static const char all[] =
        "AEASATCSDADSDTFLFDISLOLTOBODOFOLOVOWPNSHSLSQSSSTSVTMUCUIULUNURUSUTUV";
    for (size_t i = 0; i + 1 < sizeof all; i += 2)
        if (vr[0] == all[i] && vr[1] == all[i + 1])
            return 1;
    return 0;
}

static int s_long_vr(const uint8_t *vr) {
    static const char *const longs[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ",
                                        "SV", "UC", "UN", "UR", "UT", "UV"};
    for (size_t i = 0; i < sizeof longs / sizeof longs[0]; i++)
        if (vr[0] == longs[i][0] && vr[1] == longs[i][1])
            return 1;
    return 0;
}

static int s_bad(s_walk *w, size_t at, const char *what, uint32_t tag) {
    return mm_errorf(w->err, w->errlen, MM_EPROTO,
                     "dicom: malformed or truncated data set at byte %zu of %zu: %s (element "
                     "%04X,%04X)",
                     at, w->n, what, tag >> 16, tag & 0xffff);
}

static int s_walk_items(s_walk *w, size_t *pos, size_t end, int explicit_vr, int big, int depth,
                        int fragments, uint32_t owner);

/* Elements from *pos until end, or until an item delimiter when end is
 * undefined (SIZE_MAX: the item had undefined length). */
static int s_walk_set(s_walk *w, size_t *pos, size_t end, int explicit_vr, int big, int depth) {
    if (depth > S_MAX_DEPTH)
        return s_bad(w, *pos, "sequences nested too deeply", 0);
    size_t limit = end == SIZE_MAX ? w->n : end;
    while (*pos < limit) {
        size_t p = *pos;
        if (limit - p < 8)
            return s_bad(w, p, "element header cut short", 0);
        uint32_t tag = (uint32_t)s_rd16(w, p, big) << 16 | s_rd16(w, p + 2, big);
        if (tag == 0xfffee00du) { /* item delimiter */
            if (end != SIZE_MAX)
                return s_bad(w, p, "item delimiter in an item of defined length", tag);
            *pos = p + 8;
            return MM_OK;
        }
        if ((tag >> 16) == 0xfffe)
            return s_bad(w, p, "unexpected item tag in a data set", tag);
        uint32_t len;
        size_t hdr;
        int is_sq = 0, is_un = 0;
        if (explicit_vr) {
            const uint8_t *vr = w->b + p + 4;
            if ((vr[0] >= 'A' && vr[0] <= 'Z' && vr[1] >= 'A' && vr[1] <= 'Z') && !s_known_vr(vr))
                return s_bad(w, p, "unknown value representation", tag);
            if (vr[0] < 'A' || vr[0] > 'Z' || vr[1] < 'A' || vr[1] > 'Z') {
                /* an implicit-VR element inside an explicit data set: old
                 * writers do this, and GDCM and pydicom both read it so */
                len = s_rd32(w, p + 4, big);
                hdr = 8;
            } else if (s_long_vr(vr)) {
                if (limit - p < 12)
                    return s_bad(w, p, "element header cut short", tag);
                len = s_rd32(w, p + 8, big);
                hdr = 12;
            } else {
                len = s_rd16(w, p + 6, big);
                hdr = 8;
            }
            is_sq = vr[0] == 'S' && vr[1] == 'Q';
            is_un = vr[0] == 'U' && vr[1] == 'N';
        } else {
            len = s_rd32(w, p + 4, big);
            hdr = 8;
        }
        *pos = p + hdr;
        if (tag == T_PIXEL_DATA && len == S_UNDEFINED && depth == 0) {
            int rc = s_walk_items(w, pos, SIZE_MAX, explicit_vr, big, depth + 1, 1, tag);
            if (rc)
                return rc;
        } else if (len == S_UNDEFINED) {
            if (!is_sq && explicit_vr && !is_un)
                return s_bad(w, p, "undefined length on a non-sequence", tag);
            /* an SQ, an implicit-VR sequence, or UN holding implicit LE */
            int rc = s_walk_items(w, pos, SIZE_MAX, is_un ? 0 : explicit_vr, is_un ? 0 : big,
                                  depth + 1, 0, tag);
            if (rc)
                return rc;
        } else {
            if (len > limit - *pos)
                return s_bad(w, p, "value length runs past the end", tag);
            if (is_sq) {
                int rc = s_walk_items(w, pos, *pos + len, explicit_vr, big, depth + 1, 0, tag);
                if (rc)
                    return rc;
            } else {
                *pos += len;
            }
        }
    }
    if (end == SIZE_MAX)
        return s_bad(w, *pos, "item without its delimiter", 0);
    if (*pos != end)
        return s_bad(w, *pos, "item length does not match its elements", 0);
    return MM_OK;
}

/* Items of a sequence (or fragments of encapsulated Pixel Data) from *pos
 * until end, or until the sequence delimiter when end is SIZE_MAX. */
static int s_walk_items(s_walk *w, size_t *pos, size_t end, int explicit_vr, int big, int depth,
                        int fragments, uint32_t owner) {
    if (depth > S_MAX_DEPTH)
        return s_bad(w, *pos, "sequences nested too deeply", owner);
    size_t limit = end == SIZE_MAX ? w->n : end;
    while (*pos < limit) {
        size_t p = *pos;
        if (limit - p < 8)
            return s_bad(w, p, "item header cut short", owner);
        uint32_t tag = (uint32_t)s_rd16(w, p, big) << 16 | s_rd16(w, p + 2, big);
        uint32_t len = s_rd32(w, p + 4, big);
        *pos = p + 8;
        if (tag == 0xfffee0ddu) { /* sequence delimiter */
            if (end != SIZE_MAX)
                return s_bad(w, p, "sequence delimiter in a sequence of defined length", owner);
            return MM_OK;
        }
        if (tag != 0xfffee000u)
            return s_bad(w, p, fragments ? "Pixel Data fragment is not an item" : "not an item",
                         owner);
        if (fragments) {
            if (len == S_UNDEFINED || len > limit - *pos)
                return s_bad(w, p, "Pixel Data fragment runs past the end", owner);
            size_t *o = realloc(w->frag_off, (w->nfrag + 1) * sizeof *o);
            if (o)
                w->frag_off = o;
            size_t *l = o ? realloc(w->frag_len, (w->nfrag + 1) * sizeof *l) : NULL;
            if (!o || !l)
                return mm_errorf(w->err, w->errlen, MM_ENOMEM, "dicom: out of memory");
            w->frag_len = l;
            w->frag_off[w->nfrag] = *pos;
            w->frag_len[w->nfrag++] = len;
            *pos += len;
        } else if (len == S_UNDEFINED) {
            int rc = s_walk_set(w, pos, SIZE_MAX, explicit_vr, big, depth + 1);
            if (rc)
                return rc;
        } else {
            if (len > limit - *pos)
                return s_bad(w, p, "item length runs past the end", owner);
            int rc = s_walk_set(w, pos, *pos + len, explicit_vr, big, depth + 1);
            if (rc)
                return rc;
        }
    }
    if (end == SIZE_MAX)
        return s_bad(w, *pos, "sequence without its delimiter", owner);
    return MM_OK;
}

static void s_walk_free(s_walk *w) {
    free(w->frag_off);
    free(w->frag_len);
    w->frag_off = w->frag_len = NULL;
    w->nfrag = 0;
}

/* The whole buffer: preamble, meta group, data set. */
static int s_walk_all(s_walk *w) {
    size_t pos = 0;
    if (w->n >= 132 && memcmp(w->b + 128, "DICM", 4) == 0)
        pos = 132;
    else if (w->n < 8)
        return s_bad(w, 0, "too short to be DICOM", 0);
    /* the meta group (0002,xxxx): always explicit VR little endian */
    size_t meta = pos;
    while (w->n - pos >= 8 && s_rd16(w, pos, 0) == 0x0002) {
        uint32_t tag = 0x00020000u | s_rd16(w, pos + 2, 0);
        const uint8_t *vr = w->b + pos + 4;
        if (!s_known_vr(vr))
            return s_bad(w, pos, "meta element without a valid value representation", tag);
        size_t hdr = s_long_vr(vr) ? 12 : 8;
        if (w->n - pos < hdr)
            return s_bad(w, pos, "meta element header cut short", tag);
        uint32_t len = hdr == 12 ? s_rd32(w, pos + 8, 0) : s_rd16(w, pos + 6, 0);
        if (len > w->n - pos - hdr)
            return s_bad(w, pos, "meta element runs past the end", tag);
        if (tag == 0x00020010u) {
            size_t k = len < sizeof w->ts - 1 ? len : sizeof w->ts - 1;
            memcpy(w->ts, w->b + pos + hdr, k);
            w->ts[k] = '\0';
            while (k > 0 && (w->ts[k - 1] == ' ' || w->ts[k - 1] == '\0'))
                w->ts[--k] = '\0';
        }
        pos += hdr + len;
    }
    if (pos == w->n) /* GDCM 3.0.21 aborts (an assert) on a meta group with nothing after it */
        return s_bad(w, pos, "no data set after the File Meta Information", 0);
    if (pos > meta && !w->ts[0])
        return s_bad(w, meta, "the meta group names no Transfer Syntax UID", 0x00020010u);
    if (strcmp(w->ts, "1.2.840.10008.1.2.1.99") == 0)
        return MM_OK; /* deflated: GDCM inflates, the walk stops at the meta group */
    if (w->ts[0]) {
        w->explicit_vr = strcmp(w->ts, "1.2.840.10008.1.2") != 0;
        w->big = strcmp(w->ts, "1.2.840.10008.1.2.2") == 0;
    } else { /* no meta group: guess as GDCM does, from the first element */
        if (w->n - pos < 8)
            return s_bad(w, pos, "too short to be DICOM", 0);
        const uint8_t *vr = w->b + pos + 4;
        w->explicit_vr = vr[0] >= 'A' && vr[0] <= 'Z' && vr[1] >= 'A' && vr[1] <= 'Z';
        w->big = s_rd16(w, pos, 0) > 0x00ff && s_rd16(w, pos, 1) <= 0x00ff;
    }
    return s_walk_set(w, &pos, w->n, w->explicit_vr, w->big, 0);
}

/* ------------------------------------------------------------------------ */
/* Header                                                                   */
/* ------------------------------------------------------------------------ */

typedef enum { S_MONO1, S_MONO2, S_PALETTE, S_RGB, S_YBR_FULL, S_YBR_422 } s_pi;

/* A lookup table: the first item of a LUT sequence or a palette channel. */
typedef struct s_lut {
    size_t n;       /* entries (the descriptor's 0 means 65536)      */
    long first;     /* first mapped input value                      */
    unsigned bits;  /* bits per entry (8..16)                        */
    uint16_t *data; /* [n] entries, owned                            */
} s_lut;

typedef struct s_hdr {
    mm_dicom_info info;
    s_pi pi;
    unsigned high_bit;
    unsigned planar;
    double slope, intercept; /* rescale, 1 / 0 by default */
    int has_mlut;            /* Modality LUT Sequence */
    s_lut mlut;
    int has_window; /* the file's first valid window */
    double wc, ww;
    char voi_function[20]; /* "LINEAR" (default), "LINEAR_EXACT", "SIGMOID" */
    int has_vlut;          /* VOI LUT Sequence */
    s_lut vlut;
    s_lut pal[3];    /* PALETTE COLOR red, green, blue */
    int frame_frags; /* encapsulated, one fragment a frame */
} s_hdr;

static void s_hdr_free(s_hdr *h) {
    free(h->mlut.data);
    free(h->vlut.data);
    for (int i = 0; i < 3; i++)
        free(h->pal[i].data);
    memset(h, 0, sizeof *h);
}

/* A LUT from a descriptor (3 US) and its data (US/OW). what: for errors. */
static int s_read_lut(const mm_gdcm_file *f, uint32_t seq, uint32_t desc_tag, uint32_t data_tag,
                      int signed_first, const char *what, s_lut *lut, char *err, size_t errlen) {
    unsigned d0, d1, d2;
    if (s_us(f, seq, desc_tag, 0, &d0) != 1 || s_us(f, seq, desc_tag, 1, &d1) != 1 ||
        s_us(f, seq, desc_tag, 2, &d2) != 1)
        return mm_errorf(err, errlen, MM_EPROTO,
                         "dicom: %s: LUT Descriptor missing or not 3 values", what);
    lut->n = d0 ? d0 : 65536;
    lut->first = signed_first ? (long)(int16_t)d1 : (long)d1;
    lut->bits = d2;
    if (d2 < 1 || d2 > 16)
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: %s: LUT Descriptor says %u bits an entry",
                         what, d2);
    const uint8_t *d;
    size_t n;
    if (!mm_gdcm_value(f, seq, data_tag, &d, &n) || n == 0)
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: %s: no LUT Data", what);
    if (!(lut->data = malloc(lut->n * sizeof *lut->data)))
        return mm_errorf(err, errlen, MM_ENOMEM, "dicom: %s: out of memory", what);
    if (n >= 2 * lut->n) { /* one 16-bit word an entry */
        for (size_t i = 0; i < lut->n; i++)
            lut->data[i] = (uint16_t)(d[2 * i] | d[2 * i + 1] << 8);
    } else if (d2 <= 8 && n >= lut->n) { /* 8-bit entries packed two a word */
        for (size_t i = 0; i < lut->n; i++)
            lut->data[i] = d[i];
    } else {
        return mm_errorf(err, errlen, MM_EPROTO,
                         "dicom: %s: LUT Data has %zu bytes, the descriptor needs %zu entries",
                         what, n, lut->n);
    }
    if (d2 < 16)
        for (size_t i = 0; i < lut->n; i++)
            lut->data[i] &= (uint16_t)((1u << d2) - 1);
    return MM_OK;
}

static int s_required_us(const mm_gdcm_file *f, uint32_t tag, const char *name, unsigned *v,
                         char *err, size_t errlen) {
    int r = s_us(f, 0, tag, 0, v);
    if (r == 1)
        return MM_OK;
    return mm_errorf(err, errlen, MM_EPROTO, "dicom: %s (%04X,%04X) %s", name, tag >> 16,
                     tag & 0xffff, r == 0 ? "is missing" : "has a malformed value");
}

/* Everything about the image from the header, checked. with_luts: also read
 * the modality/VOI/palette LUTs (not needed to probe). */
static int s_read_header(const mm_gdcm_file *f, const s_walk *w, int with_luts, s_hdr *h, char *err,
                         size_t errlen) {
    memset(h, 0, sizeof *h);
    mm_dicom_info *in = &h->info;
    int rc;
    snprintf(in->transfer_syntax, sizeof in->transfer_syntax, "%s", mm_gdcm_transfer_syntax(f));
    s_str(f, 0, T_MODALITY, 0, in->modality, sizeof in->modality);
    s_printable(in->modality);
    s_printable(in->transfer_syntax);
    s_str(f, 0, T_SOP_INSTANCE_UID, 0, in->sop_instance_uid, sizeof in->sop_instance_uid);
    const uint8_t *d;
    size_t n;
    if (mm_gdcm_value(f, 0, T_FLOAT_PIXEL_DATA, &d, &n) ||
        mm_gdcm_value(f, 0, T_DOUBLE_PIXEL_DATA, &d, &n))
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "dicom: float / double pixel data (parametric maps) is not supported");
    unsigned rows = 0, cols = 0, spp = 1, ba = 0, bs = 0, hb = 0, pr = 0;
    if ((rc = s_required_us(f, T_ROWS, "Rows", &rows, err, errlen)) ||
        (rc = s_required_us(f, T_COLS, "Columns", &cols, err, errlen)))
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "dicom: not an image: no Rows/Columns (modality '%s'; an SR, RT plan or "
                         "other non-image object has no pixels to show)",
                         in->modality);
    if ((rc = s_required_us(f, T_BITS_ALLOCATED, "Bits Allocated", &ba, err, errlen)))
        return rc;
    if (s_us(f, 0, T_SAMPLES, 0, &spp) != 1)
        spp = 1; /* absent in some old files; PS3.3 makes it type 1, viewers assume 1 */
    if (s_us(f, 0, T_BITS_STORED, 0, &bs) != 1)
        bs = ba;
    if (s_us(f, 0, T_HIGH_BIT, 0, &hb) != 1)
        hb = bs - 1;
    if (s_us(f, 0, T_PIXEL_REPR, 0, &pr) != 1)
        pr = 0;
    if (s_us(f, 0, T_PLANAR, 0, &h->planar) != 1)
        h->planar = 0;
    if (rows == 0 || cols == 0)
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: empty image (%u x %u pixels)", cols, rows);
    if (ba != 1 && ba != 8 && ba != 16 && ba != 32)
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "dicom: Bits Allocated %u (supported: 1, 8, 16, 32)", ba);
    if (bs < 1 || bs > ba)
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: Bits Stored %u with Bits Allocated %u", bs,
                         ba);
    if (hb >= ba || hb + 1 < bs)
        return mm_errorf(err, errlen, MM_EPROTO,
                         "dicom: High Bit %u with Bits Stored %u and Bits Allocated %u", hb, bs,
                         ba);
    if (pr > 1)
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: Pixel Representation %u (0 or 1)", pr);
    if (h->planar > 1)
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: Planar Configuration %u (0 or 1)",
                         h->planar);
    if (spp != 1 && spp != 3)
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "dicom: Samples per Pixel %u (supported: 1 and 3)", spp);
    double fr = 1;
    char fb[32];
    if (s_str(f, 0, T_FRAMES, 0, fb, sizeof fb)) {
        char *end;
        fr = strtod(fb, &end);
        if (end == fb || *end || !(fr >= 1) || fr > 1e6 || fr != floor(fr))
            return mm_errorf(err, errlen, MM_EPROTO,
                             "dicom: Number of Frames '%.16s' is not a "
                             "whole number >= 1",
                             fb);
    }
    char pi[20];
    if (!s_str(f, 0, T_PHOTOMETRIC, 0, pi, sizeof pi))
        snprintf(pi, sizeof pi, "%s", spp == 1 ? "MONOCHROME2" : "RGB"); /* as pydicom/GDCM */
    s_printable(pi);
    snprintf(in->photometric, sizeof in->photometric, "%s", pi);
    static const struct {
        const char *name;
        s_pi pi;
        unsigned spp;
    } pis[] = {{"MONOCHROME1", S_MONO1, 1},     {"MONOCHROME2", S_MONO2, 1},
               {"PALETTE COLOR", S_PALETTE, 1}, {"RGB", S_RGB, 3},
               {"YBR_FULL", S_YBR_FULL, 3},     {"YBR_FULL_422", S_YBR_422, 3},
               {"YBR_RCT", S_RGB, 3},           {"YBR_ICT", S_RGB, 3}};
    size_t k = 0;
    while (k < sizeof pis / sizeof pis[0] && strcmp(pis[k].name, pi) != 0)
        k++;
    if (k == sizeof pis / sizeof pis[0])
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "dicom: Photometric Interpretation '%.16s' is not supported "
                         "(MONOCHROME1/2, PALETTE COLOR, RGB, YBR_FULL, YBR_FULL_422, "
                         "YBR_RCT/ICT)",
                         pi);
    if (pis[k].spp != spp)
        return mm_errorf(err, errlen, MM_EPROTO,
                         "dicom: Photometric Interpretation %s with Samples per Pixel %u", pi, spp);
    h->pi = pis[k].pi;
    /* from the walk: a headers-only parse has no Pixel Data element */
    in->encapsulated = w->nfrag > 0 || (!w->ts[0] && mm_gdcm_encapsulated(f));
    if (ba == 1 && (spp != 1 || in->encapsulated))
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "dicom: 1-bit pixels are supported for native greyscale only");
    if ((h->pi == S_YBR_FULL || h->pi == S_YBR_422) && ba != 8)
        return mm_errorf(err, errlen, MM_EUNSUPPORTED, "dicom: %s with %u bits allocated", pi, ba);
    if (h->pi == S_YBR_422 && !in->encapsulated && cols % 2)
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: YBR_FULL_422 with an odd width (%u)",
                         cols);
    if (strcmp(pi, "YBR_RCT") == 0 || strcmp(pi, "YBR_ICT") == 0) {
        if (!in->encapsulated)
            return mm_errorf(err, errlen, MM_EPROTO,
                             "dicom: %s is only valid for JPEG 2000 pixel data", pi);
    }
    in->rows = rows;
    in->cols = cols;
    in->frames = (size_t)fr;
    in->samples = spp;
    in->bits_allocated = ba;
    in->bits_stored = bs;
    in->is_signed = (int)pr;
    h->high_bit = hb;
    /* encapsulated frames are decoded one at a time when each has its own
     * fragment (the usual layout, and RLE's rule); otherwise all at once */
    in->decode_pixels = (size_t)rows * cols;
    h->frame_frags = in->encapsulated && w->nfrag == in->frames + 1;
    if (in->encapsulated && !h->frame_frags &&
        !mm_size_mul(in->decode_pixels, in->frames, &in->decode_pixels))
        in->decode_pixels = SIZE_MAX;

    h->slope = 1;
    h->intercept = 0;
    if (!s_num(f, 0, T_RESCALE_SLOPE, 0, &h->slope))
        h->slope = 1;
    if (!s_num(f, 0, T_RESCALE_INTERCEPT, 0, &h->intercept))
        h->intercept = 0;
    if (s_num(f, 0, T_WINDOW_CENTER, 0, &h->wc) && s_num(f, 0, T_WINDOW_WIDTH, 0, &h->ww))
        h->has_window = 1;
    if (!s_str(f, 0, T_VOI_FUNCTION, 0, h->voi_function, sizeof h->voi_function))
        snprintf(h->voi_function, sizeof h->voi_function, "LINEAR");
    if (strcmp(h->voi_function, "LINEAR") && strcmp(h->voi_function, "LINEAR_EXACT") &&
        strcmp(h->voi_function, "SIGMOID"))
        snprintf(h->voi_function, sizeof h->voi_function, "LINEAR"); /* PS3.3: default */
    /* a width below the function's minimum makes the window unusable: fall
     * through to the next VOI source, as viewers do */
    if (h->has_window && (strcmp(h->voi_function, "LINEAR") == 0 ? h->ww < 1 : h->ww <= 0))
        h->has_window = 0;
    if (!with_luts)
        return MM_OK;
    int grey = h->pi == S_MONO1 || h->pi == S_MONO2;
    if (grey && mm_gdcm_value(f, T_MODALITY_LUT_SEQ, T_LUT_DESCRIPTOR, &d, &n)) {
        if ((rc = s_read_lut(f, T_MODALITY_LUT_SEQ, T_LUT_DESCRIPTOR, T_LUT_DATA, (int)pr,
                             "Modality LUT Sequence", &h->mlut, err, errlen)))
            return rc;
        h->has_mlut = 1;
    }
    if (grey && mm_gdcm_value(f, T_VOI_LUT_SEQ, T_LUT_DESCRIPTOR, &d, &n)) {
        /* the VOI LUT's input is the modality output: signed when that can be */
        int sgn = h->has_mlut ? 0 : ((int)pr || h->intercept < 0 || h->slope < 0);
        if ((rc = s_read_lut(f, T_VOI_LUT_SEQ, T_LUT_DESCRIPTOR, T_LUT_DATA, sgn,
                             "VOI LUT Sequence", &h->vlut, err, errlen)))
            return rc;
        h->has_vlut = 1;
    }
    if (h->pi == S_PALETTE) {
        static const char *ch[3] = {"red", "green", "blue"};
        if (mm_gdcm_value(f, 0, T_SEG_PALETTE_DATA, &d, &n))
            return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                             "dicom: segmented palette colour LUTs are not supported");
        for (int c = 0; c < 3; c++) {
            char what[48];
            snprintf(what, sizeof what, "palette %s", ch[c]);
            if ((rc = s_read_lut(f, 0, T_PALETTE_DESC + (uint32_t)c, T_PALETTE_DATA + (uint32_t)c,
                                 0, what, &h->pal[c], err, errlen)))
                return rc;
            if (h->pal[c].bits != 8 && h->pal[c].bits != 16)
                return mm_errorf(err, errlen, MM_EPROTO,
                                 "dicom: palette %s: %u bits an entry (8 or 16)", ch[c],
                                 h->pal[c].bits);
        }
    }
    return MM_OK;
}

/* ------------------------------------------------------------------------ */
/* Public: probe and option checks                                          */
/* ------------------------------------------------------------------------ */

/* A buffer checked (s_walk_all), parsed by GDCM and its header read. */
typedef struct s_doc {
    s_walk w;
    mm_gdcm_file *f;
    s_hdr h;
} s_doc;

static void s_doc_close(s_doc *d) {
    s_walk_free(&d->w);
    mm_gdcm_free(&d->f);
    s_hdr_free(&d->h);
}

static int s_doc_open(s_doc *d, const void *bytes, size_t len, int headers_only, char *err,
                      size_t errlen) {
    memset(d, 0, sizeof *d);
    if (!bytes || len == 0)
        return mm_errorf(err, errlen, MM_EINVAL, "dicom: empty buffer (0 bytes)");
    d->w.b = bytes;
    d->w.n = len;
    d->w.err = err;
    d->w.errlen = errlen;
    int rc = s_walk_all(&d->w);
    if (rc == MM_OK)
        rc = mm_gdcm_parse(bytes, len, headers_only, &d->f, err, errlen);
    if (rc == MM_OK)
        rc = s_read_header(d->f, &d->w, !headers_only, &d->h, err, errlen);
    if (rc != MM_OK)
        s_doc_close(d);
    return rc;
}

int mm_dicom_probe(const void *bytes, size_t len, mm_dicom_info *info, char *err, size_t errlen) {
    if (!info)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_dicom_probe: info is NULL");
    memset(info, 0, sizeof *info);
    s_doc d;
    int rc = s_doc_open(&d, bytes, len, 1, err, errlen);
    if (rc != MM_OK)
        return rc;
    *info = d.h.info;
    s_doc_close(&d);
    return MM_OK;
}

int mm_dicom_check_options(const mm_dicom_info *info, const mm_dicom_options *o, char *err,
                           size_t errlen) {
    if (!o)
        return MM_OK;
    if ((unsigned)o->window >= S_N_WINDOWS)
        return mm_errorf(err, errlen, MM_EINVAL, "window: unknown preset %d", (int)o->window);
    if (o->frame > info->frames)
        return mm_errorf(err, errlen, MM_EINVAL, "frame: %u, but the image has %zu frame%s",
                         o->frame, info->frames, info->frames == 1 ? "" : "s");
    if (S_WINDOWS[o->window].width > 0) {
        if (info->samples != 1 || strcmp(info->photometric, "PALETTE COLOR") == 0)
            return mm_errorf(err, errlen, MM_EINVAL,
                             "window: '%s' applies to greyscale CT, this image is %s",
                             S_WINDOWS[o->window].name, info->photometric);
        if (strcmp(info->modality, "CT") != 0)
            return mm_errorf(err, errlen, MM_EINVAL,
                             "window: '%s' is a CT preset in Hounsfield units, this image's "
                             "modality is '%s'",
                             S_WINDOWS[o->window].name, info->modality);
    }
    return MM_OK;
}

/* ------------------------------------------------------------------------ */
/* Pixels                                                                   */
/* ------------------------------------------------------------------------ */

/* One frame's samples, as the file stores them (after any decompression). */
typedef struct s_frame {
    const uint8_t *base; /* the pixel bytes of all frames (or just this one) */
    size_t bit0;         /* bit offset of this frame's first sample (1-bit data) */
    size_t byte0;        /* byte offset of this frame's first sample */
    unsigned ba, bs, shift;
    int is_signed;
    int swap_halves; /* 32-bit samples with their 16-bit halves swapped */
} s_frame;

/* Sample i (0-based, in storage order) of the frame: bits stored below high
 * bit, sign-extended when signed. */
static inline int64_t s_sample(const s_frame *fr, size_t i) {
    uint32_t raw;
    switch (fr->ba) {
    case 1: {
        size_t b = fr->bit0 + i;
        raw = (fr->base[b >> 3] >> (b & 7)) & 1u; /* PS3.5 8.1.1: first pixel in bit 0 */
        break;
    }
    case 8: raw = fr->base[fr->byte0 + i]; break;
    case 16: {
        const uint8_t *p = fr->base + fr->byte0 + 2 * i;
        raw = (uint32_t)p[0] | (uint32_t)p[1] << 8;
        break;
    }
    default: {
        const uint8_t *p = fr->base + fr->byte0 + 4 * i;
        raw = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        if (fr->swap_halves)
            raw = raw >> 16 | raw << 16;
        break;
    }
    }
    uint64_t v =
        (uint64_t)(raw >> fr->shift) & ((fr->bs == 32 ? 0xffffffffull : (1ull << fr->bs) - 1));
    if (fr->is_signed && (v >> (fr->bs - 1)) & 1)
        return (int64_t)v - (int64_t)(1ull << fr->bs);
    return (int64_t)v;
}

static inline uint8_t s_round8(double y) {
    if (!(y > 0)) /* NaN too */
        return 0;
    if (y >= 255)
        return 255;
    return (uint8_t)floor(y + 0.5);
}

/* The modality LUT: stored value -> modality value. */
static inline double s_modality(const s_hdr *h, int64_t s) {
    if (h->has_mlut) {
        int64_t i = s - h->mlut.first;
        if (i < 0)
            i = 0;
        if (i >= (int64_t)h->mlut.n)
            i = (int64_t)h->mlut.n - 1;
        return h->mlut.data[i];
    }
    return (double)s * h->slope + h->intercept;
}

/* How the VOI stage maps a modality value to 0..255, decided once a frame. */
typedef enum { S_VOI_WINDOW, S_VOI_LUT, S_VOI_RANGE } s_voi_kind;
typedef struct s_voi {
    s_voi_kind kind;
    double c, w;   /* window */
    int fn;        /* 0 LINEAR, 1 LINEAR_EXACT, 2 SIGMOID */
    double lo, hi; /* full range */
    int invert;    /* MONOCHROME1 */
} s_voi;

static inline uint8_t s_voi_apply(const s_hdr *h, const s_voi *v, double m) {
    double y;
    switch (v->kind) {
    case S_VOI_WINDOW:
        if (v->fn == 2) {
            y = 255.0 / (1.0 + exp(-4.0 * (m - v->c) / v->w));
        } else if (v->fn == 1) {
            y = ((m - v->c) / v->w + 0.5) * 255.0;
        } else if (m <= v->c - 0.5 - (v->w - 1) / 2) {
            y = 0;
        } else if (m > v->c - 0.5 + (v->w - 1) / 2) {
            y = 255;
        } else {
            y = ((m - (v->c - 0.5)) / (v->w - 1) + 0.5) * 255.0;
        }
        break;
    case S_VOI_LUT: {
        double i = floor(m) - (double)h->vlut.first;
        size_t k = i < 0 ? 0 : i >= (double)h->vlut.n ? h->vlut.n - 1 : (size_t)i;
        y = h->vlut.data[k] * 255.0 / (double)((1u << h->vlut.bits) - 1);
        break;
    }
    default: y = v->hi > v->lo ? (m - v->lo) * 255.0 / (v->hi - v->lo) : 0; break;
    }
    uint8_t r = s_round8(y);
    return v->invert ? (uint8_t)(255 - r) : r;
}

/* Greyscale: modality + VOI for n samples into RGB. For bits stored <= 16
 * every possible stored value is mapped once into a table. */
static int s_grey(const s_hdr *h, const mm_dicom_options *o, const s_frame *fr, size_t n,
                  uint8_t *rgb, char *err, size_t errlen) {
    int64_t smin = INT64_MAX, smax = INT64_MIN;
    for (size_t i = 0; i < n; i++) {
        int64_t s = s_sample(fr, i);
        if (s < smin)
            smin = s;
        if (s > smax)
            smax = s;
    }
    int table = fr->bs <= 16;
    s_voi v = {.invert = h->pi == S_MONO1};
    mm_dicom_window w = o->window;
    if (S_WINDOWS[w].width > 0) {
        v.kind = S_VOI_WINDOW;
        v.w = S_WINDOWS[w].width;
        v.c = S_WINDOWS[w].center;
    } else if (w == MM_DICOM_WINDOW_AUTO && h->has_window) {
        v.kind = S_VOI_WINDOW;
        v.w = h->ww;
        v.c = h->wc;
        v.fn = strcmp(h->voi_function, "LINEAR_EXACT") == 0 ? 1
               : strcmp(h->voi_function, "SIGMOID") == 0    ? 2
                                                            : 0;
    } else if (w == MM_DICOM_WINDOW_AUTO && h->has_vlut) {
        v.kind = S_VOI_LUT;
    } else {
        v.kind = S_VOI_RANGE;
        v.lo = INFINITY;
        v.hi = -INFINITY;
        if (table) { /* every stored value in [smin, smax] (the LUT need not be monotonic) */
            for (int64_t s = smin; s <= smax; s++) {
                double m = s_modality(h, s);
                v.lo = m < v.lo ? m : v.lo;
                v.hi = m > v.hi ? m : v.hi;
            }
        } else {
            for (size_t i = 0; i < n; i++) {
                double m = s_modality(h, s_sample(fr, i));
                v.lo = m < v.lo ? m : v.lo;
                v.hi = m > v.hi ? m : v.hi;
            }
        }
    }
    if (table) {
        size_t span = (size_t)(smax - smin) + 1;
        uint8_t *lut = malloc(span);
        if (!lut)
            return mm_errorf(err, errlen, MM_ENOMEM, "dicom: out of memory for the VOI table");
        for (size_t k = 0; k < span; k++)
            lut[k] = s_voi_apply(h, &v, s_modality(h, smin + (int64_t)k));
        for (size_t i = 0; i < n; i++) {
            uint8_t y = lut[s_sample(fr, i) - smin];
            rgb[3 * i] = rgb[3 * i + 1] = rgb[3 * i + 2] = y;
        }
        free(lut);
    } else {
        for (size_t i = 0; i < n; i++) {
            uint8_t y = s_voi_apply(h, &v, s_modality(h, s_sample(fr, i)));
            rgb[3 * i] = rgb[3 * i + 1] = rgb[3 * i + 2] = y;
        }
    }
    return MM_OK;
}

/* JFIF / PS3.3 C.7.6.3.1.2 YCbCr (full range) -> RGB. */
static inline void s_ybr(int y, int cb, int cr, uint8_t *out) {
    out[0] = s_round8(y + 1.402 * (cr - 128));
    out[1] = s_round8(y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128));
    out[2] = s_round8(y + 1.772 * (cb - 128));
}

/* Colour frames (3 samples, or a palette) into RGB. ybr422_packed: native
 * YBR_FULL_422 (Y0 Y1 Cb Cr per pair of pixels). */
static void s_colour(const s_hdr *h, const s_frame *fr, size_t npix, int planar, int ybr422_packed,
                     uint8_t *rgb) {
    if (h->pi == S_PALETTE) {
        for (size_t i = 0; i < npix; i++) {
            int64_t s = s_sample(fr, i);
            for (int c = 0; c < 3; c++) {
                const s_lut *l = &h->pal[c];
                int64_t k = s - l->first;
                k = k < 0 ? 0 : k >= (int64_t)l->n ? (int64_t)l->n - 1 : k;
                unsigned e = l->data[k];
                rgb[3 * i + c] = l->bits == 16 ? (uint8_t)((e + 128) / 257) : (uint8_t)e;
            }
        }
        return;
    }
    for (size_t i = 0; i < npix; i++) {
        int64_t px[3];
        if (ybr422_packed) {
            size_t pair = i / 2;
            px[0] = s_sample(fr, 4 * pair + (i & 1));
            px[1] = s_sample(fr, 4 * pair + 2);
            px[2] = s_sample(fr, 4 * pair + 3);
        } else {
            for (int c = 0; c < 3; c++)
                px[c] = s_sample(fr, planar ? (size_t)c * npix + i : 3 * i + (size_t)c);
        }
        if (h->pi == S_YBR_FULL || h->pi == S_YBR_422) {
            s_ybr((int)px[0], (int)px[1], (int)px[2], rgb + 3 * i);
        } else if (fr->bs <= 8 && !fr->is_signed) {
            for (int c = 0; c < 3; c++)
                rgb[3 * i + c] = (uint8_t)px[c];
        } else { /* scale the stored range to 0..255 */
            double lo = fr->is_signed ? -ldexp(1, (int)fr->bs - 1) : 0;
            double span = ldexp(1, (int)fr->bs) - 1;
            for (int c = 0; c < 3; c++)
                rgb[3 * i + c] = s_round8(((double)px[c] - lo) * 255.0 / span);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Public: decode                                                           */
/* ------------------------------------------------------------------------ */

/* PS3.5 Annex G: one RLE frame (a fragment) into little-endian interleaved
 * samples of bps bytes: segment k holds byte (k % bps) counted from the most
 * significant, of sample k / bps, PackBits-coded. */
static int s_rle_frame(const uint8_t *frag, size_t len, size_t npix, unsigned spp, unsigned bps,
                       uint8_t *dst, char *err, size_t errlen) {
    if (len < 64)
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: RLE fragment of %zu bytes has no header",
                         len);
    uint32_t nseg = (uint32_t)frag[0] | (uint32_t)frag[1] << 8 | (uint32_t)frag[2] << 16 |
                    (uint32_t)frag[3] << 24;
    if (nseg != spp * bps)
        return mm_errorf(err, errlen, MM_EPROTO,
                         "dicom: RLE header has %u segments, %u samples of %u bytes need %u", nseg,
                         spp, bps, spp * bps);
    uint32_t off[16];
    for (uint32_t k = 0; k < nseg; k++) {
        const uint8_t *p = frag + 4 + 4 * k;
        off[k] = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        if (off[k] < 64 || off[k] > len || (k && off[k] < off[k - 1]))
            return mm_errorf(err, errlen, MM_EPROTO, "dicom: RLE segment %u offset %u is invalid",
                             k + 1, off[k]);
    }
    for (uint32_t k = 0; k < nseg; k++) {
        size_t p = off[k], end = k + 1 < nseg ? off[k + 1] : len, i = 0;
        size_t stride = (size_t)spp * bps, at = (k / bps) * bps + (bps - 1 - k % bps);
        while (i < npix && p < end) {
            int c = (int8_t)frag[p++];
            if (c >= 0) { /* copy c + 1 literal bytes */
                size_t m = (size_t)c + 1;
                if (m > end - p || m > npix - i)
                    return mm_errorf(err, errlen, MM_EPROTO,
                                     "dicom: RLE segment %u overruns its frame", k + 1);
                for (size_t j = 0; j < m; j++)
                    dst[(i + j) * stride + at] = frag[p + j];
                p += m;
                i += m;
            } else if (c != -128) { /* repeat the next byte 1 - c times */
                size_t m = (size_t)(1 - c);
                if (p >= end || m > npix - i)
                    return mm_errorf(err, errlen, MM_EPROTO,
                                     "dicom: RLE segment %u overruns its frame", k + 1);
                for (size_t j = 0; j < m; j++)
                    dst[(i + j) * stride + at] = frag[p];
                p++;
                i += m;
            }
        }
        if (i < npix)
            return mm_errorf(err, errlen, MM_EPROTO,
                             "dicom: RLE segment %u ends after %zu of %zu pixels", k + 1, i, npix);
    }
    return MM_OK;
}

/* 8-bit JPEG baseline (the common lossy syntax) is decoded here with
 * libjpeg-turbo, as image.c decodes JPEG files, not by GDCM: GDCM's 8-bit
 * JPEG codec ends in assert(0) on some corrupt streams (found by mutating
 * test files), which would take the whole server down. libjpeg reports
 * errors through error_exit (a longjmp here); its warnings about corrupt
 * data are recoverable and silent, as in GDCM. Colour is left as the DICOM
 * header says (RGB, or YCbCr upsampled by libjpeg and converted by
 * s_colour), never guessed from JFIF/Adobe markers. */
typedef struct s_jerr {
    struct jpeg_error_mgr pub;
    jmp_buf jb;
    char msg[JMSG_LENGTH_MAX];
} s_jerr;

static void s_jerr_exit(j_common_ptr c) {
    s_jerr *e = (s_jerr *)c->err;
    (*c->err->format_message)(c, e->msg);
    longjmp(e->jb, 1);
}

static void s_jerr_emit(j_common_ptr c, int level) { (void)c, (void)level; }

static int s_jpeg8_frame(const uint8_t *frag, size_t len, size_t cols, size_t rows, unsigned spp,
                         int ybr, uint8_t *dst, char *err, size_t errlen) {
    struct jpeg_decompress_struct ci;
    s_jerr je;
    const char *why = NULL;
    ci.err = jpeg_std_error(&je.pub);
    je.pub.error_exit = s_jerr_exit;
    je.pub.emit_message = s_jerr_emit;
    jpeg_create_decompress(&ci);
    if (setjmp(je.jb)) {
        jpeg_destroy_decompress(&ci);
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: JPEG baseline frame: %s", je.msg);
    }
    jpeg_mem_src(&ci, frag, (unsigned long)len);
    jpeg_read_header(&ci, TRUE);
    if (ci.image_width != cols || ci.image_height != rows)
        why = "its size differs from Rows/Columns";
    else if (ci.num_components != (int)spp)
        why = "its number of components differs from Samples per Pixel";
    else if (ci.data_precision != 8)
        why = "it is not 8-bit";
    if (why) {
        jpeg_destroy_decompress(&ci);
        return mm_errorf(err, errlen, MM_EPROTO, "dicom: JPEG baseline frame: %s", why);
    }
    if (spp == 3)
        ci.jpeg_color_space = ci.out_color_space = ybr ? JCS_YCbCr : JCS_RGB;
    else
        ci.out_color_space = JCS_GRAYSCALE;
    jpeg_start_decompress(&ci);
    while (ci.output_scanline < ci.output_height) {
        JSAMPROW row = dst + (size_t)ci.output_scanline * cols * spp;
        jpeg_read_scanlines(&ci, &row, 1);
    }
    jpeg_finish_decompress(&ci);
    jpeg_destroy_decompress(&ci);
    return MM_OK;
}

int mm_dicom_decode(const void *bytes, size_t len, const mm_dicom_options *o, size_t max_pixels,
                    mm_image **out, char *err, size_t errlen) {
    if (!out)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_dicom_decode: out is NULL");
    *out = NULL;
    mm_dicom_options def;
    if (!o) {
        mm_dicom_options_default(&def);
        o = &def;
    }
    if (max_pixels == 0)
        max_pixels = MM_IMAGE_DEFAULT_MAX_PIXELS;
    s_doc d;
    uint8_t *frames = NULL;
    mm_image *img = NULL;
    int rc = s_doc_open(&d, bytes, len, 0, err, errlen);
    if (rc != MM_OK)
        return rc;
    s_hdr *h = &d.h;
    mm_dicom_info *in = &h->info;
    if ((rc = mm_dicom_check_options(in, o, err, errlen)) != MM_OK)
        goto done;
    if (in->decode_pixels > max_pixels) {
        rc = mm_errorf(err, errlen, MM_EINVAL,
                       "dicom: %zu x %zu%s = %zu pixels to decode exceeds the pixel limit of %zu",
                       in->cols, in->rows,
                       in->decode_pixels > in->cols * in->rows ? " x frames" : "",
                       in->decode_pixels, max_pixels);
        goto done;
    }
    size_t frame = o->frame ? o->frame - 1 : (in->frames - 1) / 2; /* 0-based */
    size_t npix = in->rows * in->cols;
    /* native YBR_FULL_422 keeps 2 samples a pixel (Y Y Cb Cr a pair) */
    int packed422 = h->pi == S_YBR_422 && !in->encapsulated;
    size_t nsamp = npix * (packed422 ? 2 : in->samples);
    s_frame fr = {.ba = in->bits_allocated,
                  .bs = in->bits_stored,
                  .shift = h->high_bit + 1 - in->bits_stored,
                  .is_signed = in->is_signed};
    if (in->encapsulated) {
        /* one frame (or, without a fragment a frame, all of them); the codecs
         * give 3 samples a pixel for YBR_FULL_422 too (upsampled) */
        size_t bps = in->bits_allocated / 8, per = npix * in->samples * bps;
        size_t nfr = h->frame_frags ? 1 : in->frames, all, written = 0;
        if (!mm_size_mul(per, nfr, &all) || !(frames = malloc(all))) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "dicom: out of memory for the decoded frame");
            goto done;
        }
        mm_gdcm_pixels px = {(unsigned)in->cols, (unsigned)in->rows,      (unsigned)nfr,
                             in->samples,        in->bits_allocated,      in->bits_stored,
                             h->high_bit,        (unsigned)in->is_signed, h->planar,
                             in->photometric};
        int rle = strcmp(in->transfer_syntax, "1.2.840.10008.1.2.5") == 0;
        if (rle && !h->frame_frags) {
            rc = mm_errorf(err, errlen, MM_EPROTO,
                           "dicom: RLE needs one fragment a frame: %zu fragments for %zu frames",
                           d.w.nfrag ? d.w.nfrag - 1 : 0, in->frames);
            goto done;
        }
        if (h->frame_frags) {
            const uint8_t *fp = d.w.b + d.w.frag_off[1 + frame];
            size_t fl = d.w.frag_len[1 + frame];
            if (rle) {
                rc = s_rle_frame(fp, fl, npix, in->samples, (unsigned)bps, frames, err, errlen);
                written = all;
            } else if (strcmp(in->transfer_syntax, "1.2.840.10008.1.2.4.50") == 0 &&
                       in->bits_allocated == 8) {
                rc = s_jpeg8_frame(fp, fl, in->cols, in->rows, in->samples,
                                   h->pi == S_YBR_FULL || h->pi == S_YBR_422, frames, err, errlen);
                written = all;
            } else {
                rc = mm_gdcm_decode_fragment(in->transfer_syntax, &px, fp, fl, frames, all,
                                             &written, err, errlen);
            }
            frame = 0;
        } else {
            rc = mm_gdcm_decode(d.f, &px, frames, all, &written, err, errlen);
        }
        if (rc != MM_OK)
            goto done;
        if (written < per * nfr) {
            rc = mm_errorf(err, errlen, MM_EPROTO,
                           "dicom: the %s codec produced %zu bytes, the header needs %zu",
                           in->transfer_syntax, written, per * nfr);
            goto done;
        }
        fr.base = frames;
        fr.byte0 = frame * per;
        /* the codecs (and s_rle_frame) return interleaved samples whatever
         * the planar configuration says */
        h->planar = 0;
        if (h->pi == S_YBR_422)
            h->pi = S_YBR_FULL; /* upsampled by the codec */
    } else {
        const uint8_t *pd;
        size_t n;
        if (!mm_gdcm_value(d.f, 0, T_PIXEL_DATA, &pd, &n) || n == 0) {
            rc = mm_errorf(err, errlen, MM_EPROTO, "dicom: no Pixel Data (7FE0,0010)");
            goto done;
        }
        size_t bits_frame, bits_all;
        if (!mm_size_mul(nsamp, in->bits_allocated, &bits_frame) ||
            !mm_size_mul(bits_frame, in->frames, &bits_all) || (bits_all + 7) / 8 > n) {
            rc = mm_errorf(err, errlen, MM_EPROTO,
                           "dicom: Pixel Data has %zu bytes, less than the header needs (%zu x "
                           "%zu x %zu frame%s, %u samples of %u bits a pixel)",
                           n, in->cols, in->rows, in->frames, in->frames == 1 ? "" : "s",
                           packed422 ? 2 : in->samples, in->bits_allocated);
            goto done;
        }
        fr.base = pd;
        fr.bit0 = frame * bits_frame;
        fr.byte0 = fr.bit0 / 8;
        /* GDCM swaps big-endian OW as 16-bit words: 32-bit samples still
         * have their halves the wrong way round */
        fr.swap_halves = d.w.big && in->bits_allocated == 32;
    }
    if ((rc = mm_image_new(in->cols, in->rows, &img, err, errlen)) != MM_OK)
        goto done;
    if (h->pi == S_MONO1 || h->pi == S_MONO2)
        rc = s_grey(h, o, &fr, npix, img->rgb, err, errlen);
    else
        s_colour(h, &fr, npix, (int)h->planar, packed422, img->rgb);
    if (rc == MM_OK) {
        *out = img;
        img = NULL;
    }
done:
    mm_image_destroy(&img);
    free(frames);
    s_doc_close(&d);
    return rc;
}

int mm_dicom_fuzz_one(const uint8_t *data, size_t size) {
    char err[512];
    mm_dicom_info info;
    mm_image *img = NULL;
    mm_dicom_probe(data, size, &info, err, sizeof err);
    mm_dicom_decode(data, size, NULL, (size_t)16 << 20, &img, err, sizeof err);
    mm_image_destroy(&img);
    return 0;
}
