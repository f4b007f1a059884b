/* sr.c — the Basic Text SR of medmoe-pacs, written as DICOM Part 10 (see sr.h).
 *
 * Encoding (PS3.5 §7.1.2, Explicit VR Little Endian): tag (group, element as
 * u16 LE), VR (2 chars), then a u16 length — or, for OB/SQ/UT/UN, two reserved
 * bytes and a u32 length. Values are padded to an even length (UI with NUL,
 * text with a space). Sequences and items use undefined length closed by
 * delimiters, so nothing has to be measured before it is written; only the
 * File Meta group carries its group length. Elements go in ascending tag order
 * at each level (PS3.5 §7.1): the functions below are called in that order. */
#include "sr.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hash.h"
#include "status.h"

/* The SOP class and the transfer syntax of what is written. */
#define S_BASIC_TEXT_SR "1.2.840.10008.5.1.4.1.1.88.11"
#define S_EXPLICIT_LE "1.2.840.10008.1.2.1"
/* Our implementation class UID (PS3.7 D.3.3.2): a fixed 2.25 UID made once with mm_sr_uid
 * from "medmoe-pacs implementation class". */
#define S_IMPL_CLASS_UID "2.25.202222038015597464657834195332672562662"
#define S_IMPL_VERSION "MEDMOE_PACS_1"

typedef struct s_w {
    uint8_t *p; /* the bytes so far                           */
    size_t n;   /* used                                       */
    size_t cap; /* allocated                                  */
    int nomem;  /* sticky: an allocation failed               */
    char *err;  /* caller's error buffer                      */
    size_t errlen;
    int rc; /* first error (MM_OK while none)             */
} s_w;

static void s_put(s_w *w, const void *d, size_t n) {
    if (w->nomem)
        return;
    if (w->n + n > w->cap) {
        size_t cap = w->cap ? w->cap : 4096;
        while (cap < w->n + n)
            cap *= 2;
        uint8_t *p = realloc(w->p, cap);
        if (!p) {
            w->nomem = 1;
            return;
        }
        w->p = p;
        w->cap = cap;
    }
    memcpy(w->p + w->n, d, n);
    w->n += n;
}

static void s_u16(s_w *w, unsigned v) {
    uint8_t b[2] = {(uint8_t)v, (uint8_t)(v >> 8)};
    s_put(w, b, 2);
}

static void s_u32(s_w *w, uint32_t v) {
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    s_put(w, b, 4);
}

static void s_tag(s_w *w, uint32_t tag) {
    s_u16(w, tag >> 16);
    s_u16(w, tag & 0xffff);
}

static int s_long_vr(const char *vr) {
    return !strcmp(vr, "OB") || !strcmp(vr, "SQ") || !strcmp(vr, "UT") || !strcmp(vr, "UN");
}

/* Largest value each VR we write may hold (PS3.5 Table 6.2-1), in bytes
 * (characters, for the ASCII ones; a UTF-8 LO/SH/PN may hold fewer). */
static size_t s_vr_max(const char *vr) {
    static const struct {
        const char *vr;
        size_t max;
    } t[] = {{"AE", 16},  {"CS", 16}, {"DA", 8},  {"IS", 12}, {"LO", 64},
             {"PN", 324}, {"SH", 16}, {"TM", 16}, {"UI", 64}, {"UT", 0xfffffffe}};
    for (size_t i = 0; i < sizeof t / sizeof *t; i++)
        if (!strcmp(t[i].vr, vr))
            return t[i].max;
    return 0;
}

/* One string element; s NULL = empty (a present, empty type 2 attribute). */
static void s_str(s_w *w, uint32_t tag, const char *vr, const char *s) {
    if (w->rc != MM_OK)
        return;
    size_t n = s ? strlen(s) : 0;
    if (n > s_vr_max(vr)) {
        w->rc = mm_errorf(w->err, w->errlen, MM_EINVAL,
                          "SR: (%04X,%04X) %s: %zu bytes, at most %zu allowed", tag >> 16,
                          tag & 0xffff, vr, n, s_vr_max(vr));
        return;
    }
    size_t padded = n + (n & 1);
    s_tag(w, tag);
    s_put(w, vr, 2);
    if (s_long_vr(vr)) {
        s_u16(w, 0);
        s_u32(w, (uint32_t)padded);
    } else {
        s_u16(w, (unsigned)padded);
    }
    if (n)
        s_put(w, s, n);
    if (n & 1)
        s_put(w, !strcmp(vr, "UI") ? "\0" : " ", 1);
}

static void s_int(s_w *w, uint32_t tag, int v) {
    char b[16];
    snprintf(b, sizeof b, "%d", v);
    s_str(w, tag, "IS", b);
}

static void s_seq_begin(s_w *w, uint32_t tag) {
    s_tag(w, tag);
    s_put(w, "SQ", 2);
    s_u16(w, 0);
    s_u32(w, 0xffffffffu);
}

static void s_item_begin(s_w *w) {
    s_tag(w, 0xfffee000u);
    s_u32(w, 0xffffffffu);
}

static void s_item_end(s_w *w) {
    s_tag(w, 0xfffee00du);
    s_u32(w, 0);
}

static void s_seq_end(s_w *w) {
    s_tag(w, 0xfffee0ddu);
    s_u32(w, 0);
}

static void s_empty_seq(s_w *w, uint32_t tag) {
    s_seq_begin(w, tag);
    s_seq_end(w);
}

/* A code sequence with one item: (0008,0100) value, (0008,0102) scheme, (0008,0104) meaning. */
static void s_code(s_w *w, uint32_t tag, const char *value, const char *scheme,
                   const char *meaning) {
    s_seq_begin(w, tag);
    s_item_begin(w);
    s_str(w, 0x00080100u, "SH", value);
    s_str(w, 0x00080102u, "SH", scheme);
    s_str(w, 0x00080104u, "LO", meaning);
    s_item_end(w);
    s_seq_end(w);
}

/* The start of a content item: (0040,A010) relationship, (0040,A040) value
 * type, (0040,A043) concept name. The caller writes the value and s_item_end. */
static void s_content(s_w *w, const char *rel, const char *type, const char *code,
                      const char *scheme, const char *meaning) {
    s_item_begin(w);
    s_str(w, 0x0040a010u, "CS", rel);
    s_str(w, 0x0040a040u, "CS", type);
    s_code(w, 0x0040a043u, code, scheme, meaning);
}

static void s_text_item(s_w *w, const char *rel, const char *code, const char *scheme,
                        const char *meaning, const char *text) {
    s_content(w, rel, "TEXT", code, scheme, meaning);
    s_str(w, 0x0040a160u, "UT", text);
    s_item_end(w);
}

/* (0008,1150) class, (0008,1155) instance, in one item of tag's sequence. */
static void s_sop_ref(s_w *w, uint32_t tag, const char *cls, const char *inst) {
    s_seq_begin(w, tag);
    s_item_begin(w);
    s_str(w, 0x00081150u, "UI", cls);
    s_str(w, 0x00081155u, "UI", inst);
    s_item_end(w);
    s_seq_end(w);
}

static void s_meta(s_w *w, const mm_sr_input *in) {
    s_w m = {.err = w->err, .errlen = w->errlen, .rc = MM_OK};
    static const uint8_t version[2] = {0, 1};
    s_tag(&m, 0x00020001u);
    s_put(&m, "OB", 2);
    s_u16(&m, 0);
    s_u32(&m, 2);
    s_put(&m, version, 2);
    s_str(&m, 0x00020002u, "UI", S_BASIC_TEXT_SR);
    s_str(&m, 0x00020003u, "UI", in->sr_sop_uid);
    s_str(&m, 0x00020010u, "UI", S_EXPLICIT_LE);
    s_str(&m, 0x00020012u, "UI", S_IMPL_CLASS_UID);
    s_str(&m, 0x00020013u, "SH", S_IMPL_VERSION);
    static const uint8_t zeros[128];
    s_put(w, zeros, sizeof zeros);
    s_put(w, "DICM", 4);
    s_tag(w, 0x00020000u);
    s_put(w, "UL", 2);
    s_u16(w, 4);
    s_u32(w, (uint32_t)m.n);
    if (m.nomem)
        w->nomem = 1;
    else
        s_put(w, m.p, m.n);
    if (m.rc != MM_OK && w->rc == MM_OK)
        w->rc = m.rc;
    free(m.p);
}

int mm_sr_build(const mm_sr_input *in, uint8_t **out, size_t *out_len, char *err, size_t errlen) {
    *out = NULL;
    *out_len = 0;
    const struct {
        const char *v, *name;
    } uids[] = {{in->study_uid, "study_uid"},         {in->series_uid, "series_uid"},
                {in->sop_class_uid, "sop_class_uid"}, {in->sop_uid, "sop_uid"},
                {in->sr_sop_uid, "sr_sop_uid"},       {in->sr_series_uid, "sr_series_uid"},
                {in->device_uid, "device_uid"}};
    for (size_t i = 0; i < sizeof uids / sizeof *uids; i++)
        if (!uids[i].v || !mm_sr_uid_valid(uids[i].v))
            return mm_errorf(err, errlen, MM_EINVAL, "SR: %s: '%s' is not a DICOM UID",
                             uids[i].name, uids[i].v ? uids[i].v : "(none)");
    if (!in->answer || !in->question)
        return mm_errorf(err, errlen, MM_EINVAL, "SR: the question and the answer are required");
    s_w w = {.err = err, .errlen = errlen, .rc = MM_OK};
    s_meta(&w, in);
    char fp_note[160];
    snprintf(fp_note, sizeof fp_note, "%s",
             in->model_fingerprint && *in->model_fingerprint ? in->model_fingerprint
                                                             : "unknown (the server reports none)");
    /* SOP Common, SR Document Series and General, General Study, Patient: ascending tags. */
    /* The default repertoire (ASCII) unless some text needs more: then UTF-8. */
    const char *texts[] = {in->patient_name, in->referring_physician,
                           in->question,     in->answer,
                           in->model,        in->experts,
                           in->study_id,     in->accession};
    int ascii = 1;
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++)
        for (const char *c = texts[i]; c && *c; c++)
            ascii &= (unsigned char)*c < 0x80;
    if (!ascii)
        s_str(&w, 0x00080005u, "CS", "ISO_IR 192");
    s_str(&w, 0x00080012u, "DA", in->content_date);
    s_str(&w, 0x00080013u, "TM", in->content_time);
    s_str(&w, 0x00080016u, "UI", S_BASIC_TEXT_SR);
    s_str(&w, 0x00080018u, "UI", in->sr_sop_uid);
    s_str(&w, 0x00080020u, "DA", in->study_date);
    s_str(&w, 0x00080023u, "DA", in->content_date);
    s_str(&w, 0x00080030u, "TM", in->study_time);
    s_str(&w, 0x00080033u, "TM", in->content_time);
    s_str(&w, 0x00080050u, "SH", in->accession);
    s_str(&w, 0x00080060u, "CS", "SR");
    s_str(&w, 0x00080070u, "LO", "medmoe");
    s_str(&w, 0x00080090u, "PN", in->referring_physician);
    s_str(&w, 0x0008103eu, "LO", "medmoe AI answer (machine-generated)");
    s_str(&w, 0x00081090u, "LO", "medmoe-pacs");
    s_empty_seq(&w, 0x00081111u); /* Referenced Performed Procedure Step: type 2 */
    s_str(&w, 0x00100010u, "PN", in->patient_name);
    s_str(&w, 0x00100020u, "LO", in->patient_id);
    s_str(&w, 0x00100030u, "DA", in->patient_birth_date);
    s_str(&w, 0x00100040u, "CS", in->patient_sex);
    s_str(&w, 0x00181020u, "LO", in->software_version);
    s_str(&w, 0x0020000du, "UI", in->study_uid);
    s_str(&w, 0x0020000eu, "UI", in->sr_series_uid);
    s_str(&w, 0x00200010u, "SH", in->study_id);
    s_int(&w, 0x00200011u, in->sr_series_number);
    s_int(&w, 0x00200013u, 1);
    /* The document root: a CONTAINER titled as a diagnostic imaging report. */
    s_str(&w, 0x0040a040u, "CS", "CONTAINER");
    s_code(&w, 0x0040a043u, "18748-4", "LN", "Diagnostic imaging report");
    s_str(&w, 0x0040a050u, "CS", "SEPARATE");
    s_empty_seq(&w, 0x0040a372u); /* Performed Procedure Code: type 2 */
    /* Current Requested Procedure Evidence: study > series > the instance answered for. */
    s_seq_begin(&w, 0x0040a375u);
    s_item_begin(&w);
    s_seq_begin(&w, 0x00081115u);
    s_item_begin(&w);
    s_sop_ref(&w, 0x00081199u, in->sop_class_uid, in->sop_uid);
    s_str(&w, 0x0020000eu, "UI", in->series_uid);
    s_item_end(&w);
    s_seq_end(&w);
    s_str(&w, 0x0020000du, "UI", in->study_uid);
    s_item_end(&w);
    s_seq_end(&w);
    s_str(&w, 0x0040a491u, "CS", "COMPLETE");
    s_str(&w, 0x0040a493u, "CS", "UNVERIFIED"); /* no person has verified it */
    /* The content tree. */
    s_seq_begin(&w, 0x0040a730u);
    /* Observer context: a device, not a person (TID 1004). */
    s_content(&w, "HAS OBS CONTEXT", "CODE", "121005", "DCM", "Observer Type");
    s_code(&w, 0x0040a168u, "121007", "DCM", "Device");
    s_item_end(&w);
    s_content(&w, "HAS OBS CONTEXT", "UIDREF", "121012", "DCM", "Device Observer UID");
    s_str(&w, 0x0040a124u, "UI", in->device_uid);
    s_item_end(&w);
    s_text_item(&w, "HAS OBS CONTEXT", "121013", "DCM", "Device Observer Name", "medmoe-pacs");
    s_text_item(&w, "HAS OBS CONTEXT", "121014", "DCM", "Device Observer Manufacturer", "medmoe");
    s_text_item(&w, "HAS OBS CONTEXT", "121015", "DCM", "Device Observer Model Name",
                in->model ? in->model : "Med-MoE");
    /* The algorithm (TID 4019): name, version = the model fingerprint, parameters. */
    s_text_item(&w, "CONTAINS", "111001", "DCM", "Algorithm Name",
                in->model ? in->model : "Med-MoE");
    s_text_item(&w, "CONTAINS", "111003", "DCM", "Algorithm Version", fp_note);
    s_text_item(&w, "CONTAINS", "111002", "DCM", "Algorithm Parameters",
                in->experts && *in->experts ? in->experts : "(the server reported no routing)");
    s_text_item(&w, "CONTAINS", "QUESTION", "99MEDMOE", "Question", in->question);
    /* The answer, inferred from the image it references. */
    s_content(&w, "CONTAINS", "TEXT", "121071", "DCM", "Finding");
    s_str(&w, 0x0040a160u, "UT", in->answer);
    s_seq_begin(&w, 0x0040a730u);
    s_item_begin(&w);
    s_sop_ref(&w, 0x00081199u, in->sop_class_uid, in->sop_uid);
    s_str(&w, 0x0040a010u, "CS", "INFERRED FROM");
    s_str(&w, 0x0040a040u, "CS", "IMAGE");
    s_item_end(&w);
    s_seq_end(&w);
    s_item_end(&w);
    char comment[512];
    snprintf(comment, sizeof comment,
             "Machine-generated by medmoe (model fingerprint %.64s); not reviewed by a physician.",
             fp_note);
    s_text_item(&w, "CONTAINS", "121106", "DCM", "Comment", comment);
    s_seq_end(&w);
    if (w.rc == MM_OK && w.nomem)
        w.rc = mm_errorf(err, errlen, MM_ENOMEM, "SR: out of memory");
    if (w.rc != MM_OK) {
        free(w.p);
        return w.rc;
    }
    *out = w.p;
    *out_len = w.n;
    return MM_OK;
}

void mm_sr_uid(const char *const *parts, size_t n, char out[MM_SR_UID_MAX]) {
    mm_sha256 h;
    uint8_t d[MM_SHA256_BYTES] = {0};
    if (mm_sha256_init(&h) == MM_OK) {
        for (size_t i = 0; i < n; i++)
            mm_sha256_update(&h, parts[i], strlen(parts[i]) + 1);
        mm_sha256_final(&h, d);
    }
    d[6] = (uint8_t)((d[6] & 0x0f) | 0x80); /* version 8 */
    d[8] = (uint8_t)((d[8] & 0x3f) | 0x80); /* variant 10 */
    /* 128-bit big-endian integer -> decimal, by repeated division by 10. */
    uint8_t num[16];
    memcpy(num, d, 16);
    char digits[40];
    size_t nd = 0;
    for (;;) {
        unsigned rem = 0;
        int zero = 1;
        for (int i = 0; i < 16; i++) {
            unsigned cur = rem * 256u + num[i];
            num[i] = (uint8_t)(cur / 10u);
            rem = cur % 10u;
            if (num[i])
                zero = 0;
        }
        digits[nd++] = (char)('0' + rem);
        if (zero)
            break;
    }
    size_t o = (size_t)snprintf(out, MM_SR_UID_MAX, "2.25.");
    while (nd > 0 && o + 1 < MM_SR_UID_MAX)
        out[o++] = digits[--nd];
    out[o] = '\0';
}

int mm_sr_uid_valid(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 64)
        return 0;
    const char *p = s;
    while (*p) {
        if (*p < '0' || *p > '9')
            return 0;
        if (*p == '0' && p[1] >= '0' && p[1] <= '9')
            return 0; /* a component with a leading zero */
        while (*p >= '0' && *p <= '9')
            p++;
        if (*p == '.') {
            p++;
            if (!*p)
                return 0;
        } else if (*p) {
            return 0;
        }
    }
    return 1;
}
