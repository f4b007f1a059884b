/* pacs.h — medmoe-pacs, the bridge between a PACS (Orthanc, over DICOMweb) and
 * medmoe-router (gRPC): the bridge object; main_pacs.c only parses arguments.
 * docs/PACS.md is the administrator's guide.
 *
 * pull   one study (optionally one series or instance): read its metadata
 *        (QIDO-RS), choose a representative image, fetch it (WADO-RS), ask
 *        medmoe, store the answer as a Basic Text SR (sr.h) with STOW-RS.
 * watch  follow Orthanc's change feed (/changes); every StableStudy whose
 *        image modalities match a rule is pulled with that rule's question.
 *
 * The representative image: among the study's image instances (those with
 * Rows) of the wanted modality (the rule's, or --modality; any when neither),
 * and of the wanted series or instance when given, the series with most
 * instances (ties: lower SeriesNumber, then the lower UID), and in it the
 * middle instance by InstanceNumber (then SOP Instance UID): index (n-1)/2.
 *
 * At least once, never twice (watch): the state file (JSON, written to a
 * temporary file, fsync'd and renamed over the old one) holds the feed
 * position and each study answered; the position only moves past a change
 * once it has been handled. The SR's SOP Instance UID is derived from the
 * source image and the question (mm_sr_uid), and the bridge looks for it in
 * the PACS before asking: a bridge killed between storing and saving its
 * state finds its SR on restart and does not ask again. A lock (flock) on
 * <state>.lock keeps a second bridge off the same state.
 *
 * Logs never carry patient name, ID or birth date: those are copied from the
 * source into the SR and nowhere else. UIDs are logged (an administrator
 * needs them to find a study).
 */
#ifndef MM_PACS_H
#define MM_PACS_H

#include <signal.h>
#include <stddef.h>

#include "dicomweb.h"
#include "grpc_client.h"
#include "log.h"

typedef struct mm_pacs mm_pacs;

/* One watch rule: studies with an image series of this modality get this question. */
typedef struct mm_pacs_rule {
    char modality[17];   /* DICOM Modality (CS, 16 chars), or "*" for any        */
    char *question;      /* owned                                                */
    unsigned max_tokens; /* 0: the bridge's --max-tokens                         */
} mm_pacs_rule;

typedef struct mm_pacs_options {
    mm_dweb_options pacs;   /* Orthanc / DICOMweb (dicomweb.h)                   */
    const char *server;     /* medmoe-router's gRPC address HOST:PORT            */
    const char *api_key;    /* tenant key                                        */
    mm_grpc_tls tls;        /* TLS files; all NULL and tls == 0: plaintext        */
    int tls_on;             /* 1: TLS to the router (with tls, or system roots) */
    int ask_timeout_ms;     /* deadline of one Ask (default 120000)              */
    unsigned max_tokens;    /* default 0: the server's default                   */
    const char *conv_mode;  /* prompt template; NULL: the server's               */
    int send_rendered;      /* 1: ask with WADO-RS /rendered PNG; 0: the DICOM file */
    int sr_series_number;   /* SeriesNumber of the SRs (default 7701)            */
    const char *rules_file; /* JSON rules (watch; pull without --question)       */
    const char *state_file; /* watch: required                                   */
    int poll_ms;            /* watch: change feed poll interval (default 2000)   */
    int retry_ms; /* watch: first back-off after a failure (default 1000, doubles to 60 s) */
    int once;     /* watch: stop when the feed is drained (tests, cron) */
    const volatile sig_atomic_t *stop; /* SIGTERM flag                               */
    mm_log *log;                       /* borrowed                                          */
} mm_pacs_options;

void mm_pacs_options_default(mm_pacs_options *o);

/* Reads the rules file (when set), opens the PACS and router clients. The
 * connections themselves are made at first use. MM_EINVAL names the bad
 * option or rule. */
int mm_pacs_new(const mm_pacs_options *o, mm_pacs **out, char *err, size_t errlen);
void mm_pacs_destroy(mm_pacs **p);

/* What pull did. Strings owned by the result; mm_pacs_result_clear frees them. */
typedef struct mm_pacs_result {
    char *status; /* "answered" | "exists" (an SR for this image and question was there) */
    char study[65], series[65], instance[65]; /* the image answered for             */
    char sr_uid[65], sr_series[65];           /* the SR (stored, or found)           */
    char *answer;  /* NULL when status is "exists"                           */
    char *experts; /* the experts that served the image, as written in the SR */
    char model_fingerprint[65];
    double ask_ms, total_ms; /* the gRPC Ask alone; the whole pull                  */
} mm_pacs_result;
void mm_pacs_result_clear(mm_pacs_result *r);

/* pull: series/instance may be NULL; question NULL = the first rule whose
 * modality the study has; modality NULL = any (or the rule's). Errors:
 * MM_EINVAL (bad UID), MM_ENOTFOUND (no such study, or no image matches),
 * MM_EAGAIN (PACS or router unreachable, busy: worth retrying), MM_EPROTO
 * (the router refused the image, the PACS refused the SR). */
int mm_pacs_pull(mm_pacs *p, const char *study, const char *series, const char *instance,
                 const char *question, const char *modality, mm_pacs_result *res, char *err,
                 size_t errlen);

/* watch: until *stop (or, with once, until the feed is drained). MM_OK on a
 * clean stop; an error only for what a retry cannot fix (state file). */
int mm_pacs_watch(mm_pacs *p, char *err, size_t errlen);

#endif
