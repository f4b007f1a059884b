/* pacs.c — the medmoe-pacs bridge object (see pacs.h): choosing the image,
 * asking medmoe, writing the SR back, following the change feed, the state. */
#include "pacs.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "hash.h"
#include "medmoe.pb-c.h"
#include "sr.h"
#include "status.h"

#ifndef MM_PACS_VERSION
#define MM_PACS_VERSION "0.1"
#endif

struct mm_pacs {
    mm_pacs_options o;   /* as given; strings borrowed from the caller         */
    mm_dweb *pacs;       /* DICOMweb + Orthanc REST                            */
    mm_grpc_client *rpc; /* medmoe-router                                      */
    mm_pacs_rule *rules; /* [n_rules], from rules_file                         */
    size_t n_rules;
    json_t *state; /* watch: {"version":1,"since":N,"studies":{uid:{...}}} */
    int lock_fd;   /* flock'd <state>.lock, -1 when none                 */
};

/* ---- options, rules -------------------------------------------------------------------- */

void mm_pacs_options_default(mm_pacs_options *o) {
    memset(o, 0, sizeof *o);
    mm_dweb_options_default(&o->pacs);
    o->ask_timeout_ms = 120000;
    o->sr_series_number = 7701;
    o->poll_ms = 2000;
    o->retry_ms = 1000;
}

static int s_load_rules(mm_pacs *p, const char *path, char *err, size_t errlen) {
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j)
        return mm_errorf(err, errlen, MM_EINVAL, "--rules %s: line %d: %s", path, je.line, je.text);
    json_t *arr = json_object_get(j, "rules");
    int rc = MM_OK;
    if (!json_is_array(arr) || json_array_size(arr) == 0) {
        rc = mm_errorf(err, errlen, MM_EINVAL,
                       "--rules %s: want {\"rules\": [{\"modality\": "
                       "\"CT\", \"question\": \"...\"}, ...]}",
                       path);
        goto out;
    }
    size_t n = json_array_size(arr);
    if (!(p->rules = calloc(n, sizeof *p->rules))) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "--rules %s: out of memory", path);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *r = json_array_get(arr, i);
        const char *m = json_string_value(json_object_get(r, "modality"));
        const char *q = json_string_value(json_object_get(r, "question"));
        json_t *mt = json_object_get(r, "max_tokens");
        if (!m || !*m || strlen(m) > 16 || !q || !*q || (mt && !json_is_integer(mt)) ||
            (mt && (json_integer_value(mt) < 0 || json_integer_value(mt) > 100000))) {
            rc = mm_errorf(err, errlen, MM_EINVAL,
                           "--rules %s: rule %zu: want \"modality\" (1-16 chars or \"*\"), "
                           "\"question\" (non-empty) and optionally \"max_tokens\" (0-100000)",
                           path, i + 1);
            goto out;
        }
        snprintf(p->rules[i].modality, sizeof p->rules[i].modality, "%s", m);
        if (!(p->rules[i].question = strdup(q))) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "--rules %s: out of memory", path);
            goto out;
        }
        p->rules[i].max_tokens = mt ? (unsigned)json_integer_value(mt) : 0;
        p->n_rules = i + 1;
    }
out:
    json_decref(j);
    return rc;
}

int mm_pacs_new(const mm_pacs_options *o, mm_pacs **out, char *err, size_t errlen) {
    *out = NULL;
    if (!o->server)
        return mm_errorf(err, errlen, MM_EINVAL, "--server HOST:PORT (medmoe-router) is required");
    mm_pacs *p = calloc(1, sizeof *p);
    if (!p)
        return mm_errorf(err, errlen, MM_ENOMEM, "out of memory");
    p->o = *o;
    p->lock_fd = -1;
    int rc = MM_OK;
    if (o->rules_file && (rc = s_load_rules(p, o->rules_file, err, errlen)) != MM_OK)
        goto fail;
    if ((rc = mm_dweb_new(&o->pacs, &p->pacs, err, errlen)) != MM_OK)
        goto fail;
    if ((rc = mm_grpc_client_new(o->server, o->tls_on ? &o->tls : NULL, &p->rpc, err, errlen)) !=
        MM_OK)
        goto fail;
    if (o->stop)
        mm_grpc_client_set_cancel(p->rpc, o->stop); /* SIGTERM ends an Ask in flight */
    *out = p;
    return MM_OK;
fail:
    mm_pacs_destroy(&p);
    return rc;
}

void mm_pacs_destroy(mm_pacs **pp) {
    if (!pp || !*pp)
        return;
    mm_pacs *p = *pp;
    mm_dweb_destroy(&p->pacs);
    mm_grpc_client_destroy(&p->rpc);
    for (size_t i = 0; i < p->n_rules; i++)
        free(p->rules[i].question);
    free(p->rules);
    json_decref(p->state);
    if (p->lock_fd >= 0)
        close(p->lock_fd); /* releases the flock */
    free(p);
    *pp = NULL;
}

void mm_pacs_result_clear(mm_pacs_result *r) {
    free(r->status);
    free(r->answer);
    free(r->experts);
    memset(r, 0, sizeof *r);
}

/* ---- choosing the image ---------------------------------------------------------------- */

typedef struct s_inst {
    json_t *meta; /* borrowed from the metadata array */
    const char *series, *sop;
    long number;        /* InstanceNumber (LONG_MAX when absent) */
    long series_number; /* SeriesNumber (LONG_MAX when absent)   */
} s_inst;

static long s_num(json_t *meta, const char *tag) {
    char buf[32];
    const char *v = mm_dweb_attr(meta, tag, buf, sizeof buf);
    if (!v)
        return LONG_MAX;
    char *end = NULL;
    errno = 0;
    long x = strtol(v, &end, 10);
    return errno || end == v ? LONG_MAX : x;
}

static int s_cmp_inst(const void *a, const void *b) {
    const s_inst *x = a, *y = b;
    int c = strcmp(x->series, y->series);
    if (c)
        return c;
    if (x->number != y->number)
        return x->number < y->number ? -1 : 1;
    return strcmp(x->sop, y->sop);
}

/* 1 when the modality of meta matches want (NULL or "*": any). */
static int s_modality_ok(json_t *meta, const char *want) {
    if (!want || !strcmp(want, "*"))
        return 1;
    char buf[8];
    const char *m = mm_dweb_attr(meta, "00080060", buf, sizeof buf);
    return m && !strcasecmp(m, want);
}

/* The representative instance of meta (the rule in pacs.h); NULL when no image matches. */
static json_t *s_choose(json_t *meta, const char *series, const char *sop, const char *modality) {
    size_t n = json_array_size(meta), k = 0;
    s_inst *v = calloc(n ? n : 1, sizeof *v);
    if (!v)
        return NULL;
    char buf[8];
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_array_get(meta, i);
        const char *se = mm_dweb_attr(m, "0020000E", buf, sizeof buf);
        const char *in = mm_dweb_attr(m, "00080018", buf, sizeof buf);
        if (!se || !in || !json_object_get(m, "00280010") || !s_modality_ok(m, modality))
            continue; /* no Rows: not an image (an SR, a presentation state, ...) */
        if ((series && strcmp(se, series)) || (sop && strcmp(in, sop)))
            continue;
        v[k++] = (s_inst){m, se, in, s_num(m, "00200013"), s_num(m, "00200011")};
    }
    json_t *best = NULL;
    if (k > 0) {
        qsort(v, k, sizeof *v, s_cmp_inst);
        size_t best_start = 0, best_len = 0;
        for (size_t i = 0; i < k;) {
            size_t j = i;
            while (j < k && !strcmp(v[j].series, v[i].series))
                j++;
            size_t len = j - i;
            int better = best_len == 0 || len > best_len ||
                         (len == best_len && v[i].series_number < v[best_start].series_number);
            /* equal size and number: the sort already put the lower UID first */
            if (better) {
                best_start = i;
                best_len = len;
            }
            i = j;
        }
        best = v[best_start + (best_len - 1) / 2].meta;
    }
    free(v);
    return best;
}

/* The modalities of the study's image instances, as "CT,MR" (for logs and rules). */
static void s_modalities(json_t *meta, char *out, size_t outlen) {
    out[0] = '\0';
    char buf[8];
    for (size_t i = 0; i < json_array_size(meta); i++) {
        json_t *m = json_array_get(meta, i);
        const char *mod = mm_dweb_attr(m, "00080060", buf, sizeof buf);
        if (!mod || !json_object_get(m, "00280010"))
            continue;
        size_t ml = strlen(mod);
        int seen = 0;
        for (const char *s = out; *s;) {
            const char *e = strchr(s, ',');
            size_t l = e ? (size_t)(e - s) : strlen(s);
            if (l == ml && !strncmp(s, mod, l))
                seen = 1;
            s += l + (e ? 1 : 0);
        }
        if (!seen && strlen(out) + ml + 2 < outlen)
            snprintf(out + strlen(out), outlen - strlen(out), "%s%s", *out ? "," : "", mod);
    }
}

static const mm_pacs_rule *s_rule_for(const mm_pacs *p, json_t *meta) {
    for (size_t r = 0; r < p->n_rules; r++)
        for (size_t i = 0; i < json_array_size(meta); i++) {
            json_t *m = json_array_get(meta, i);
            if (json_object_get(m, "00280010") && s_modality_ok(m, p->rules[r].modality))
                return &p->rules[r];
        }
    return NULL;
}

/* ---- asking medmoe --------------------------------------------------------------------- */

static int s_grpc_status(int code) {
    switch (code) {
    case MM_GRPC_UNAVAILABLE:
    case MM_GRPC_DEADLINE_EXCEEDED:
    case MM_GRPC_RESOURCE_EXHAUSTED:
    case MM_GRPC_CANCELLED:
    case MM_GRPC_UNAUTHENTICATED: /* a key being rotated: retry rather than drop studies */
    case MM_GRPC_INTERNAL:
    case MM_GRPC_UNKNOWN: return MM_EAGAIN;
    default: return MM_EPROTO;
    }
}

typedef struct s_info {
    char fingerprint[65];
    char model[256];
    char names[32][32]; /* expert names, by index ("" when unnamed) */
    size_t n_names;
} s_info;

static int s_server_info(mm_pacs *p, s_info *info, char *err, size_t errlen) {
    memset(info, 0, sizeof *info);
    Medmoe__V1__ServerInfoRequest q = MEDMOE__V1__SERVER_INFO_REQUEST__INIT;
    uint8_t req[8];
    size_t qn = medmoe__v1__server_info_request__pack(&q, req);
    uint8_t *resp = NULL;
    size_t n = 0;
    mm_grpc_status st;
    if (mm_grpc_unary(p->rpc, "/medmoe.v1.CaseService/GetServerInfo", p->o.api_key, 10000, req, qn,
                      &resp, &n, &st) != MM_OK ||
        st.code != MM_GRPC_OK) {
        free(resp);
        return mm_errorf(err, errlen, s_grpc_status(st.code), "medmoe %s: GetServerInfo: %s: %s",
                         p->o.server, mm_grpc_code_name(st.code), st.message);
    }
    Medmoe__V1__ServerInfo *si = medmoe__v1__server_info__unpack(NULL, n, resp);
    free(resp);
    if (!si)
        return mm_errorf(err, errlen, MM_EPROTO, "medmoe %s: ServerInfo does not parse",
                         p->o.server);
    snprintf(info->fingerprint, sizeof info->fingerprint, "%s",
             si->model_fingerprint ? si->model_fingerprint : "");
    snprintf(info->model, sizeof info->model, "%s", si->model ? si->model : "");
    for (size_t i = 0; i < si->n_experts && i < 32; i++) {
        uint32_t e = si->experts[i]->expert;
        if (e < 32) {
            snprintf(info->names[e], sizeof info->names[e], "%s",
                     si->experts[i]->name ? si->experts[i]->name : "");
            if (e + 1 > info->n_names)
                info->n_names = e + 1;
        }
    }
    medmoe__v1__server_info__free_unpacked(si, NULL);
    return MM_OK;
}

/* "expert 0 (ct): 152 image tokens; expert 2 (x-ray): 1000 image tokens (over 2 MoE layers)":
 * the experts that served the image's positions, summed over the MoE layers. */
static char *s_experts_text(const Medmoe__V1__CaseAnswer *a, const s_info *info) {
    unsigned long sum[64] = {0};
    size_t ne = 0;
    for (size_t l = 0; l < a->n_routing; l++)
        for (size_t e = 0; e < a->routing[l]->n_image_tokens_per_expert && e < 64; e++) {
            sum[e] += a->routing[l]->image_tokens_per_expert[e];
            if (e + 1 > ne)
                ne = e + 1;
        }
    size_t cap = 64 + ne * 96, o = 0;
    char *s = malloc(cap);
    if (!s)
        return NULL;
    s[0] = '\0';
    for (size_t e = 0; e < ne; e++) {
        if (!sum[e])
            continue;
        const char *name = e < info->n_names ? info->names[e] : "";
        o += (size_t)snprintf(s + o, cap - o, "%sexpert %zu%s%s%s: %lu image tokens", o ? "; " : "",
                              e, *name ? " (" : "", name, *name ? ")" : "", sum[e]);
    }
    snprintf(s + o, cap - o, "%s(over %zu MoE layers)", o ? " " : "no image routing ",
             a->n_routing);
    return s;
}

static int s_ask(mm_pacs *p, const uint8_t *img, size_t img_len, const char *question,
                 unsigned max_tokens, const char *case_id, Medmoe__V1__CaseAnswer **out, char *err,
                 size_t errlen) {
    *out = NULL;
    Medmoe__V1__Image im = MEDMOE__V1__IMAGE__INIT;
    im.data.data = (uint8_t *)img;
    im.data.len = img_len;
    im.media_type = (char *)(p->o.send_rendered ? "image/png" : "application/dicom");
    Medmoe__V1__GenerationOptions go = MEDMOE__V1__GENERATION_OPTIONS__INIT;
    go.max_tokens = max_tokens;
    Medmoe__V1__CaseRequest q = MEDMOE__V1__CASE_REQUEST__INIT;
    q.case_id = (char *)case_id;
    q.image = &im;
    q.question = (char *)question;
    q.options = &go;
    q.conv_mode = (char *)(p->o.conv_mode ? p->o.conv_mode : "");
    size_t qn = medmoe__v1__case_request__get_packed_size(&q);
    uint8_t *req = malloc(qn ? qn : 1);
    if (!req)
        return mm_errorf(err, errlen, MM_ENOMEM, "out of memory (%zu bytes)", qn);
    medmoe__v1__case_request__pack(&q, req);
    uint8_t *resp = NULL;
    size_t n = 0;
    mm_grpc_status st;
    int rc = mm_grpc_unary(p->rpc, "/medmoe.v1.CaseService/Ask", p->o.api_key, p->o.ask_timeout_ms,
                           req, qn, &resp, &n, &st);
    free(req);
    if (rc != MM_OK || st.code != MM_GRPC_OK) {
        free(resp);
        if (p->o.stop && *p->o.stop)
            return mm_errorf(err, errlen, MM_ECANCELLED, "medmoe %s: Ask: abandoned (stopping)",
                             p->o.server);
        return mm_errorf(err, errlen, rc != MM_OK ? MM_EAGAIN : s_grpc_status(st.code),
                         "medmoe %s: Ask: %s: %s", p->o.server, mm_grpc_code_name(st.code),
                         st.message);
    }
    *out = medmoe__v1__case_answer__unpack(NULL, n, resp);
    free(resp);
    if (!*out)
        return mm_errorf(err, errlen, MM_EPROTO, "medmoe %s: CaseAnswer does not parse",
                         p->o.server);
    return MM_OK;
}

/* ---- pull ------------------------------------------------------------------------------ */

static void s_utc_now(char date[9], char tm[7]) {
    time_t t = time(NULL);
    struct tm u;
    gmtime_r(&t, &u);
    strftime(date, 9, "%Y%m%d", &u);
    strftime(tm, 7, "%H%M%S", &u);
}

static int s_check_uid(const char *what, const char *uid, char *err, size_t errlen) {
    if (uid && !mm_sr_uid_valid(uid))
        return mm_errorf(err, errlen, MM_EINVAL,
                         "%s '%.80s' is not a DICOM UID (digits and dots, "
                         "at most 64)",
                         what, uid);
    return MM_OK;
}

int mm_pacs_pull(mm_pacs *p, const char *study, const char *series, const char *instance,
                 const char *question, const char *modality, mm_pacs_result *res, char *err,
                 size_t errlen) {
    memset(res, 0, sizeof *res);
    double t0 = mm_now_ms();
    int rc;
    if (!study)
        return mm_errorf(err, errlen, MM_EINVAL, "a StudyInstanceUID is required");
    if ((rc = s_check_uid("StudyInstanceUID", study, err, errlen)) != MM_OK ||
        (rc = s_check_uid("SeriesInstanceUID", series, err, errlen)) != MM_OK ||
        (rc = s_check_uid("SOPInstanceUID", instance, err, errlen)) != MM_OK)
        return rc;
    json_t *meta = NULL;
    Medmoe__V1__CaseAnswer *ans = NULL;
    uint8_t *img = NULL, *sr = NULL;
    size_t img_len = 0, sr_len = 0;
    if ((rc = mm_dweb_study_metadata(p->pacs, study, series, &meta, err, errlen)) != MM_OK) {
        if (rc == MM_ENOTFOUND)
            mm_errorf(err, errlen, MM_ENOTFOUND, "study %s%s%s: not in the PACS", study,
                      series ? " series " : "", series ? series : "");
        goto out;
    }
    unsigned max_tokens = p->o.max_tokens;
    if (!question) {
        const mm_pacs_rule *r = s_rule_for(p, meta);
        char mods[128];
        s_modalities(meta, mods, sizeof mods);
        if (!r) {
            rc = mm_errorf(err, errlen, MM_ENOTFOUND,
                           "study %s: no question given and no rule matches its modalities (%s)",
                           study, *mods ? mods : "no images");
            goto out;
        }
        question = r->question;
        if (!modality)
            modality = r->modality;
        if (r->max_tokens)
            max_tokens = r->max_tokens;
    }
    json_t *m = s_choose(meta, series, instance, modality);
    if (!m) {
        rc = mm_errorf(err, errlen, MM_ENOTFOUND, "study %s: no image instance%s%s%s%s%s", study,
                       modality ? " of modality " : "", modality ? modality : "",
                       instance ? " with SOPInstanceUID " : "", instance ? instance : "",
                       series && !instance ? " in that series" : "");
        goto out;
    }
    char b0[24], b1[24], b2[24], b3[24], b4[24], b5[24], b6[24], b7[24], b8[24], b9[24], b10[24],
        b11[24];
    const char *se = mm_dweb_attr(m, "0020000E", b0, sizeof b0);
    const char *sop = mm_dweb_attr(m, "00080018", b1, sizeof b1);
    const char *cls = mm_dweb_attr(m, "00080016", b2, sizeof b2);
    if (!cls || !mm_sr_uid_valid(cls) || !mm_sr_uid_valid(se) || !mm_sr_uid_valid(sop)) {
        rc = mm_errorf(err, errlen, MM_EPROTO,
                       "study %s: instance metadata lacks valid series, "
                       "SOP class or instance UIDs",
                       study);
        goto out;
    }
    snprintf(res->study, sizeof res->study, "%s", study);
    snprintf(res->series, sizeof res->series, "%s", se);
    snprintf(res->instance, sizeof res->instance, "%s", sop);
    /* The SR's identity: the source image and the question, nothing else. */
    const char *key_sop[] = {"medmoe-pacs-sr-v1", study, se, sop, question};
    const char *key_se[] = {"medmoe-pacs-sr-series-v1", study, question};
    mm_sr_uid(key_sop, 5, res->sr_uid);
    mm_sr_uid(key_se, 3, res->sr_series);
    char case_id[40], hex[MM_SHA256_HEX];
    mm_sha256_buf_hex(res->sr_uid, strlen(res->sr_uid), hex);
    snprintf(case_id, sizeof case_id, "pacs-%.16s", hex);
    int found = 0;
    if ((rc = mm_dweb_instance_exists(p->pacs, study, res->sr_uid, &found, err, errlen)) != MM_OK)
        goto out;
    if (found) {
        mm_logf(p->o.log, MM_LOG_INFO, case_id,
                "study %s: SR %s for instance %s and this question is already in the PACS; "
                "not asking again",
                study, res->sr_uid, sop);
        res->status = strdup("exists");
        goto out;
    }
    const char *number = mm_dweb_attr(m, "00200013", b3, sizeof b3);
    mm_logf(p->o.log, MM_LOG_INFO, case_id, "study %s: chose instance %s (series %s, number %s)",
            study, sop, se, number ? number : "none");
    if ((rc = mm_dweb_retrieve(p->pacs, study, se, sop, p->o.send_rendered, &img, &img_len, err,
                               errlen)) != MM_OK)
        goto out;
    s_info info;
    if ((rc = s_server_info(p, &info, err, errlen)) != MM_OK)
        goto out;
    double ta = mm_now_ms();
    if ((rc = s_ask(p, img, img_len, question, max_tokens, case_id, &ans, err, errlen)) != MM_OK)
        goto out;
    res->ask_ms = mm_now_ms() - ta;
    res->answer = strdup(ans->answer ? ans->answer : "");
    res->experts = s_experts_text(ans, &info);
    snprintf(res->model_fingerprint, sizeof res->model_fingerprint, "%s", info.fingerprint);
    if (!res->answer || !res->experts) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "out of memory");
        goto out;
    }
    char date[9], tm[7], dev_uid[MM_SR_UID_MAX], version[64];
    s_utc_now(date, tm);
    const char *key_dev[] = {"medmoe-pacs-device-v1", info.fingerprint};
    mm_sr_uid(key_dev, 2, dev_uid);
    snprintf(version, sizeof version, "medmoe-pacs %s", MM_PACS_VERSION);
    mm_sr_input in = {
        .study_uid = study,
        .series_uid = se,
        .sop_class_uid = cls,
        .sop_uid = sop,
        .patient_name = mm_dweb_attr(m, "00100010", b4, sizeof b4),
        .patient_id = mm_dweb_attr(m, "00100020", b5, sizeof b5),
        .patient_birth_date = mm_dweb_attr(m, "00100030", b6, sizeof b6),
        .patient_sex = mm_dweb_attr(m, "00100040", b7, sizeof b7),
        .study_date = mm_dweb_attr(m, "00080020", b8, sizeof b8),
        .study_time = mm_dweb_attr(m, "00080030", b9, sizeof b9),
        .study_id = mm_dweb_attr(m, "00200010", b10, sizeof b10),
        .accession = mm_dweb_attr(m, "00080050", b11, sizeof b11),
        .referring_physician = mm_dweb_attr(m, "00080090", b3, sizeof b3),
        .sr_sop_uid = res->sr_uid,
        .sr_series_uid = res->sr_series,
        .sr_series_number = p->o.sr_series_number,
        .content_date = date,
        .content_time = tm,
        .question = question,
        .answer = res->answer,
        .model = info.model,
        .model_fingerprint = info.fingerprint,
        .experts = res->experts,
        .software_version = version,
        .device_uid = dev_uid,
    };
    if ((rc = mm_sr_build(&in, &sr, &sr_len, err, errlen)) != MM_OK)
        goto out;
    if ((rc = mm_dweb_store(p->pacs, study, sr, sr_len, err, errlen)) != MM_OK)
        goto out;
    res->status = strdup("answered");
    res->total_ms = mm_now_ms() - t0;
    mm_logf(p->o.log, MM_LOG_INFO, case_id,
            "study %s: answered in %.0f ms (ask %.0f ms, %u tokens, %s); SR %s stored (%zu bytes); "
            "model %.16s...",
            study, res->total_ms, res->ask_ms, ans->generated_tokens, res->experts, res->sr_uid,
            sr_len, *info.fingerprint ? info.fingerprint : "(no fingerprint)");
out:
    if (rc == MM_OK && !res->status)
        rc = mm_errorf(err, errlen, MM_ENOMEM, "out of memory");
    if (rc == MM_OK)
        res->total_ms = mm_now_ms() - t0;
    json_decref(meta);
    if (ans)
        medmoe__v1__case_answer__free_unpacked(ans, NULL);
    free(img);
    free(sr);
    return rc;
}

/* ---- state ----------------------------------------------------------------------------- */

static int s_state_load(mm_pacs *p, char *err, size_t errlen) {
    const char *path = p->o.state_file;
    char lock[4096];
    snprintf(lock, sizeof lock, "%s.lock", path);
    p->lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (p->lock_fd < 0)
        return mm_errorf(err, errlen, MM_EIO, "--state %s: cannot open %s: %s", path, lock,
                         strerror(errno));
    if (flock(p->lock_fd, LOCK_EX | LOCK_NB) != 0)
        return mm_errorf(err, errlen, MM_EAGAIN,
                         "--state %s: another medmoe-pacs holds %s (one bridge per state file)",
                         path, lock);
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j) {
        if (access(path, F_OK) == 0)
            return mm_errorf(err, errlen, MM_EPROTO,
                             "--state %s: line %d: %s (fix or move it away; a fresh state "
                             "re-reads the whole change feed, and existing SRs are found, not "
                             "duplicated)",
                             path, je.line, je.text);
        j = json_pack("{s:i, s:I, s:{}}", "version", 1, "since", (json_int_t)0, "studies");
        if (!j)
            return mm_errorf(err, errlen, MM_ENOMEM, "out of memory");
    }
    if (json_integer_value(json_object_get(j, "version")) != 1 ||
        !json_is_integer(json_object_get(j, "since")) ||
        !json_is_object(json_object_get(j, "studies"))) {
        json_decref(j);
        return mm_errorf(err, errlen, MM_EPROTO,
                         "--state %s: want {\"version\": 1, \"since\": N, \"studies\": {...}}",
                         path);
    }
    p->state = j;
    return MM_OK;
}

/* Write to <state>.tmp, fsync, rename over <state>, fsync the directory: a
 * crash leaves either the old state or the new one, never half of one. */
static int s_state_save(mm_pacs *p, char *err, size_t errlen) {
    const char *path = p->o.state_file;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    char *text = json_dumps(p->state, JSON_INDENT(1) | JSON_SORT_KEYS);
    if (!text)
        return mm_errorf(err, errlen, MM_ENOMEM, "--state %s: out of memory", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int rc = MM_OK;
    if (fd < 0) {
        rc = mm_errorf(err, errlen, MM_EIO, "--state %s: %s", tmp, strerror(errno));
    } else {
        size_t n = strlen(text), w = 0;
        while (w < n) {
            ssize_t k = write(fd, text + w, n - w);
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0)
                break;
            w += (size_t)k;
        }
        if (w < n || write(fd, "\n", 1) != 1 || fsync(fd) != 0)
            rc = mm_errorf(err, errlen, MM_EIO, "--state %s: write: %s", tmp, strerror(errno));
        if (close(fd) != 0 && rc == MM_OK)
            rc = mm_errorf(err, errlen, MM_EIO, "--state %s: close: %s", tmp, strerror(errno));
        if (rc == MM_OK && rename(tmp, path) != 0)
            rc = mm_errorf(err, errlen, MM_EIO, "--state %s: rename: %s", path, strerror(errno));
        if (rc == MM_OK) {
            char dir[4096];
            snprintf(dir, sizeof dir, "%s", path);
            char *slash = strrchr(dir, '/');
            if (slash)
                *(slash == dir ? slash + 1 : slash) = '\0';
            int dfd = open(slash ? dir : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (dfd >= 0) {
                fsync(dfd);
                close(dfd);
            }
        }
    }
    free(text);
    return rc;
}

static void s_state_record(mm_pacs *p, const char *study, const char *status, const char *sr,
                           const char *reason) {
    char date[9], tm[7], at[20];
    s_utc_now(date, tm);
    snprintf(at, sizeof at, "%sT%sZ", date, tm);
    json_t *e = json_pack("{s:s, s:s}", "status", status, "at", at);
    if (e && sr)
        json_object_set_new(e, "sr", json_string(sr));
    if (e && reason)
        json_object_set_new(e, "reason", json_string(reason));
    if (e)
        json_object_set_new(json_object_get(p->state, "studies"), study, e);
}

/* ---- watch ----------------------------------------------------------------------------- */

/* Sleeps ms, waking early on stop. */
static void s_nap(const mm_pacs *p, int ms) {
    while (ms > 0 && !(p->o.stop && *p->o.stop)) {
        int step = ms < 50 ? ms : 50;
        struct timespec ts = {0, (long)step * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
}

/* One StableStudy change. MM_OK: handled (answered, found, no rule, gone, or
 * failed for good and recorded); MM_EAGAIN/MM_ECANCELLED: try it again later. */
static int s_on_stable_study(mm_pacs *p, const char *orthanc_id, int *dirty, char *err,
                             size_t errlen) {
    char path[256];
    snprintf(path, sizeof path, "/studies/%.64s", orthanc_id);
    json_t *st = NULL;
    int rc = mm_dweb_rest_json(p->pacs, path, &st, err, errlen);
    if (rc == MM_ENOTFOUND) {
        mm_logf(p->o.log, MM_LOG_INFO, NULL, "Orthanc study %s: deleted before it was handled",
                orthanc_id);
        return MM_OK;
    }
    if (rc != MM_OK)
        return rc;
    const char *uid = json_string_value(
        json_object_get(json_object_get(st, "MainDicomTags"), "StudyInstanceUID"));
    char study[65];
    snprintf(study, sizeof study, "%s", uid ? uid : "");
    json_decref(st);
    if (!*study || !mm_sr_uid_valid(study)) {
        mm_logf(p->o.log, MM_LOG_WARN, NULL, "Orthanc study %s: no valid StudyInstanceUID; skipped",
                orthanc_id);
        return MM_OK;
    }
    json_t *done = json_object_get(json_object_get(p->state, "studies"), study);
    if (done) {
        mm_logf(p->o.log, MM_LOG_DEBUG, NULL, "study %s: stable again, already %s", study,
                json_string_value(json_object_get(done, "status")));
        return MM_OK;
    }
    json_t *meta = NULL;
    if ((rc = mm_dweb_study_metadata(p->pacs, study, NULL, &meta, err, errlen)) != MM_OK)
        return rc == MM_ENOTFOUND ? MM_OK : rc;
    const mm_pacs_rule *r = s_rule_for(p, meta);
    char mods[128];
    s_modalities(meta, mods, sizeof mods);
    json_decref(meta);
    if (!r) {
        mm_logf(p->o.log, MM_LOG_INFO, NULL, "study %s: stable, modalities %s: no rule; skipped",
                study, *mods ? mods : "(no images)");
        return MM_OK;
    }
    mm_logf(p->o.log, MM_LOG_INFO, NULL, "study %s: stable, modalities %s: rule %s", study, mods,
            r->modality);
    mm_pacs_result res;
    unsigned keep = p->o.max_tokens;
    if (r->max_tokens)
        p->o.max_tokens = r->max_tokens;
    rc = mm_pacs_pull(p, study, NULL, NULL, r->question, r->modality, &res, err, errlen);
    p->o.max_tokens = keep;
    if (rc == MM_OK) {
        s_state_record(p, study, res.status, res.sr_uid, NULL);
        *dirty = 1;
    } else if (rc == MM_EPROTO || rc == MM_ENOTFOUND || rc == MM_EINVAL) {
        /* Retrying cannot help (the router refused this image, the PACS refused the SR):
         * record it, say so, move on. */
        mm_logf(p->o.log, MM_LOG_ERROR, NULL, "study %s: failed, not retried: %s", study, err);
        s_state_record(p, study, "failed", NULL, err);
        *dirty = 1;
        rc = MM_OK;
    }
    mm_pacs_result_clear(&res);
    return rc;
}

int mm_pacs_watch(mm_pacs *p, char *err, size_t errlen) {
    if (!p->o.state_file)
        return mm_errorf(err, errlen, MM_EINVAL, "watch: --state FILE is required");
    if (p->n_rules == 0)
        return mm_errorf(err, errlen, MM_EINVAL, "watch: --rules FILE is required");
    int rc = s_state_load(p, err, errlen);
    if (rc != MM_OK)
        return rc;
    json_int_t since = json_integer_value(json_object_get(p->state, "since"));
    mm_logf(p->o.log, MM_LOG_INFO, NULL,
            "watching the change feed from change %lld (%zu studies handled before, %zu rules)",
            (long long)since, json_object_size(json_object_get(p->state, "studies")), p->n_rules);
    int backoff = 0;
    while (!(p->o.stop && *p->o.stop)) {
        char path[128];
        snprintf(path, sizeof path, "/changes?since=%lld&limit=100", (long long)since);
        json_t *ch = NULL;
        char e2[1024];
        rc = mm_dweb_rest_json(p->pacs, path, &ch, e2, sizeof e2);
        int dirty = 0, retry = 0;
        json_int_t pos = since;
        if (rc != MM_OK) {
            if (rc != MM_ECANCELLED)
                mm_logf(p->o.log, MM_LOG_WARN, NULL, "change feed: %s", e2);
            retry = 1;
        } else {
            json_t *arr = json_object_get(ch, "Changes");
            for (size_t i = 0; i < json_array_size(arr) && !retry; i++) {
                json_t *c = json_array_get(arr, i);
                json_int_t seq = json_integer_value(json_object_get(c, "Seq"));
                const char *type = json_string_value(json_object_get(c, "ChangeType"));
                const char *id = json_string_value(json_object_get(c, "ID"));
                if (type && id && !strcmp(type, "StableStudy")) {
                    int handled = 0;
                    rc = s_on_stable_study(p, id, &handled, e2, sizeof e2);
                    if (rc != MM_OK) {
                        if (rc != MM_ECANCELLED)
                            mm_logf(p->o.log, MM_LOG_WARN, NULL, "change %lld: %s; will retry",
                                    (long long)seq, e2);
                        retry = 1;
                        break;
                    }
                    if (handled) { /* saved at once: the window a crash can reopen is small */
                        since = pos = seq > pos ? seq : pos;
                        json_object_set_new(p->state, "since", json_integer(since));
                        if ((rc = s_state_save(p, err, errlen)) != MM_OK) {
                            json_decref(ch);
                            return rc;
                        }
                    }
                }
                pos = seq > pos ? seq : pos;
            }
            if (!retry) {
                json_int_t last = json_integer_value(json_object_get(ch, "Last"));
                pos = last > pos ? last : pos;
            }
            if (pos != since) {
                since = pos;
                json_object_set_new(p->state, "since", json_integer(since));
                dirty = 1;
            }
        }
        int drained = rc == MM_OK && json_is_true(json_object_get(ch, "Done"));
        json_decref(ch);
        if (dirty && (rc = s_state_save(p, err, errlen)) != MM_OK)
            return rc;
        if (retry) {
            backoff = backoff ? (backoff * 2 > 60000 ? 60000 : backoff * 2) : p->o.retry_ms;
            s_nap(p, backoff);
            continue;
        }
        backoff = 0;
        if (drained) {
            if (p->o.once)
                break;
            s_nap(p, p->o.poll_ms);
        }
    }
    mm_logf(p->o.log, MM_LOG_INFO, NULL, "stopped at change %lld; state saved in %s",
            (long long)since, p->o.state_file);
    return MM_OK;
}
