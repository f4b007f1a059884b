/* fuzz_case_request — hostile gRPC request bodies through mm_request_parse
 * (router-node/request_check.h): what the router does with a CaseRequest
 * (Ask, AskStream) or ClassifyRequest before it admits the case — unpack,
 * the strict text rules on the wire bytes, the value checks, the conversion
 * into a scheduler request. What it accepts must hold every rule the
 * scheduler relies on; the harness re-checks them on the result.
 *
 * Input: byte 0 bit 0 = ClassifyRequest (else CaseRequest), bit 1 = small
 * limits (16-byte question, 64-byte image, 3 candidates, 8 tokens) so the
 * limit paths are reached by small inputs; the rest is the message. */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "request_check.h"
#include "status.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len) {
    if (len < 1)
        return 0;
    mm_req_kind kind = data[0] & 1 ? MM_REQ_CLASSIFY : MM_REQ_CASE;
    mm_request_limits lim = {4096, 1 << 20, 64, 64, 512};
    if (data[0] & 2)
        lim = (mm_request_limits){16, 64, 3, 4, 8};
    mm_request req;
    char err[1024];
    int rc = mm_request_parse(data + 1, len - 1, kind, &lim, &req, err, sizeof err);
    assert(rc == MM_OK || rc == MM_EINVAL);
    assert(rc == MM_OK || strlen(err) > 0); /* a refusal always says why */
    if (req.case_id)
        assert(mm_request_check_case_id((const uint8_t *)req.case_id, strlen(req.case_id), err,
                                        sizeof err) == MM_OK);
    if (rc == MM_OK) {
        const mm_sched_request *r = &req.r;
        size_t ql = strlen(r->question);
        assert(ql > 0 && ql <= lim.max_question_bytes);
        assert(mm_request_check_text("question", (const uint8_t *)r->question, ql, err,
                                     sizeof err) == MM_OK);
        if (r->image_bytes) {
            assert(r->image_len > 0 && r->image_len <= lim.max_image_bytes);
            assert(!r->media_type || !strcmp(r->media_type, "image/png") ||
                   !strcmp(r->media_type, "image/jpeg"));
        }
        if (kind == MM_REQ_CASE) {
            assert(r->max_tokens >= 1 && r->max_tokens <= lim.max_tokens_limit);
            assert(isfinite(r->temperature) && r->temperature >= 0 && r->temperature <= 100);
            assert(r->top_p > 0 && r->top_p <= 1);
        } else {
            assert(r->n_candidate_list >= 1 && r->n_candidate_list <= lim.max_candidates);
            for (size_t i = 0; i < r->n_candidate_list; i++) {
                size_t cl = strlen(r->candidate_list[i]);
                assert(cl > 0 && cl <= lim.max_question_bytes);
                assert(mm_request_check_text("candidate", (const uint8_t *)r->candidate_list[i], cl,
                                             err, sizeof err) == MM_OK);
            }
        }
    }
    mm_request_clear(&req);
    return 0;
}
