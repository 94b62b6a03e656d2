"""The mixed-policy loss wiring: one forward pass, the pure `luffy_trl.losses` functions, TRL's normalisers.

`MixedLossMixin` is one of the pieces of `MixedPolicyGRPOTrainer` (`luffy_trl.trainer`); it replaces TRL's
`_compute_loss` (a re-implementation, not a copy; `tests/test_trainer_loss.py` checks it against stock TRL for every
loss type, both importance-sampling levels and the adaptive entropy bonus).
"""

from __future__ import annotations

import torch
from trl.trainer.utils import nanmax, nanmin

from luffy_trl.losses import SUMMED_LOSS_TYPES, aggregate_loss, mixed_policy_per_token_loss, sft_nll_loss
from luffy_trl.objectives import PPO_LOSS_TYPES
from luffy_trl.trainer.generation import IS_OFF_POLICY, TEACHER_LOGPS
from luffy_trl.trainer.micro_batches import BATCHING_INFO

# Loss types whose logged `policy_loss` TRL takes before dividing by gradient accumulation.
GA_DIVIDED_LOSS_TYPES = ("grpo", "sapo", "bnpo", "dr_grpo", "luspo")


class MixedLossMixin:
    """`_compute_loss` for mixed on-policy / teacher batches, and its metrics."""

    def _compute_loss(self, model, inputs):
        """One forward pass, LUFFY's per-token loss (`luffy_trl.losses`), TRL's normalisers and extra terms.

        Mirrors the structure of TRL 1.16's `GRPOTrainer._compute_loss` for every loss type (grpo, bnpo, dr_grpo,
        dapo, cispo, sapo, vespo, luspo; plus luffy-trl's `luffy`, LUFFY's exact scale) at token or sequence level
        (GSPO): same forward call, KL, entropy bonus (static or adaptive), entropy mask, off-policy sequence mask
        (OPSM), vLLM importance-sampling ratio and metrics; teacher rows get the shaped objective and are exempt from
        clipping, OPSM, the entropy mask and the vLLM IS ratio.
        """
        mode = "train" if self.model.training else "eval"
        # Transformers sets `current_gradient_accumulation_steps` inside the training loop only (evaluate() before
        # the first step has none); outside training nothing accumulates.
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        is_off = inputs.get(IS_OFF_POLICY)
        if is_off is None:
            is_off = torch.zeros(completion_ids.size(0), dtype=torch.bool, device=completion_ids.device)
        off_rows = is_off.view(-1, 1)

        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            num_images=inputs.get("num_images"),
            pixel_attention_mask=inputs.get("pixel_attention_mask"),
            spatial_shapes=inputs.get("spatial_shapes"),
            num_tiles=inputs.get("num_tiles"),
            image_sizes=inputs.get("image_sizes"),
            token_type_ids=inputs.get("token_type_ids"),
            mm_token_type_ids=inputs.get("mm_token_type_ids"),
            image_position_ids=inputs.get("image_position_ids"),
        )
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old_per_token_logps = inputs.get("old_per_token_logps")

        # Token weights that apply to on-policy tokens only: teacher tokens keep weight 1.
        weights = torch.ones_like(per_token_logps)
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            on_mask = mask * (~off_rows)
            entropy_mask = self.get_high_entropy_mask(entropies, on_mask, 1 - self.top_entropy_quantile)
            entropy_mask = torch.where(off_rows, torch.ones_like(entropy_mask), entropy_mask)
            weights = weights * entropy_mask
        if self.off_policy_mask_threshold is not None:
            old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
            opsm = self.get_off_policy_mask(
                advantages=advantages,
                per_token_logps=per_token_logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
            weights = weights * torch.where(off_rows, torch.ones_like(opsm), opsm)
        if self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo":
            is_ratio = inputs["importance_sampling_ratio"]  # vespo folds it into its sequence weight (as TRL)
            weights = weights * torch.where(off_rows, torch.ones_like(is_ratio), is_ratio)

        # Guidance strength: a loss-weight schedule multiplies the off-policy term (1.0, i.e. untouched, by default).
        off_policy_weight = 1.0
        if mode == "train" and self.num_off_policy > 0 and self.args.off_policy_schedule_target == "loss_weight":
            off_policy_weight = self._schedule_value()
            self._metrics[mode]["off_policy/schedule_value"].append(off_policy_weight)
        sft = self.args.off_policy_loss == "sft"
        losses = mixed_policy_per_token_loss(
            per_token_logps,
            old_per_token_logps,
            advantages,
            is_off,
            shaping=self.args.off_policy_shaping,
            gamma=self.args.policy_shaping_gamma,
            clip=self.args.on_policy_clip,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=self.args.delta,
            teacher_per_token_logps=inputs.get(TEACHER_LOGPS),
            off_policy_weight=off_policy_weight,
            off_policy_loss=self.args.off_policy_loss,
            shaping_weight=self.args.off_policy_shaping_weight,
            shaping_exponent=self.args.off_policy_shaping_exponent,
            off_policy_max_clip=self.args.off_policy_max_clip,
            off_policy_min_clip=self.args.off_policy_min_clip,
            max_token_prob=self.args.max_token_prob,
            on_policy_shaping=self.args.on_policy_shaping,
            on_policy_gamma=self.args.on_policy_shaping_gamma,
            on_policy_weight=self.args.on_policy_shaping_weight,
            on_policy_exponent=self.args.on_policy_shaping_exponent,
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            mask=mask,
            sapo_temperature_pos=self.args.sapo_temperature_pos,
            sapo_temperature_neg=self.args.sapo_temperature_neg,
            vespo_params=(self.args.vespo_k_pos, self.args.vespo_lambda_pos, self.args.vespo_k_neg,
                          self.args.vespo_lambda_neg),
            importance_sampling_ratio=inputs.get("importance_sampling_ratio") if self.loss_type == "vespo" else None,
        )
        per_token_loss = losses.per_token_loss * weights
        # "RL w/ SFT loss": the policy-gradient term covers on-policy tokens only; teacher tokens get the NLL below.
        pg_mask = mask * (~off_rows) if sft else mask
        if self.args.max_token_prob is not None:  # dropped tokens leave the normaliser's token count (LUFFY)
            pg_mask = pg_mask * losses.kept

        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:  # TRL's uncapped, unshaped exp(logp − old); 1 on teacher rows
                per_token_kl = per_token_kl * losses.importance_ratio
            per_token_loss = per_token_loss + self.beta * per_token_kl

        # Padding-free micro-batches (`padding_free_batches`) hold a varying number of rows: normalise by TRL's nominal
        # rows, and take per-micro-batch token means over the mean token count of the optimiser step's micro-batches.
        batching = inputs.get(BATCHING_INFO) if mode == "train" else None
        nominal_rows = bnpo_tokens = None
        if batching is not None:
            nominal_rows = batching["nominal_rows"]
            if self.args.max_token_prob is None:  # else the micro-batch's own kept tokens (its rows are TRL's)
                bnpo_tokens = batching["on_policy_tokens" if sft else "tokens"]
        normaliser = dict(
            max_completion_length=self.max_completion_length,
            num_items_in_batch=inputs["num_items_in_batch"],
            num_processes=self.accelerator.num_processes,
            gradient_accumulation_steps=ga,
            steps_per_generation=self.args.steps_per_generation,
            training=mode == "train",
            nominal_rows=nominal_rows,
            bnpo_tokens=bnpo_tokens,
        )
        loss = aggregate_loss(per_token_loss, pg_mask, self.loss_type, **normaliser)
        policy_loss = loss.detach() * ga if self.loss_type in GA_DIVIDED_LOSS_TYPES else loss.detach()
        accumulation = ga
        if self.loss_type in SUMMED_LOSS_TYPES:  # LUFFY sums micro-batch losses: Σ_k (pg_k − coef·H̄_k)
            accumulation = 1.0
        if self._entropy_bonus_enabled:
            # Entropy bonus = mean token entropy over the tokens the policy term acts on, scaled only for gradient
            # accumulation (TRL's definition, L = L_policy − coef · H).
            effective_mask = mask if entropy_mask is None else mask * entropy_mask
            tokens = effective_mask.sum()
            if batching is not None and entropy_mask is None:
                tokens = torch.as_tensor(batching["tokens"], dtype=entropies.dtype)
            entropy = (entropies * effective_mask).sum() / tokens.clamp(min=1.0)
            coef = self.entropy_coef
            if self.use_adaptive_entropy:  # the gate from the end of the previous optimiser step (TRL's)
                coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
            loss = loss - coef * entropy / accumulation
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if self.use_adaptive_entropy and mode == "train":
                self._update_adaptive_entropy(entropies, effective_mask)
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        sft_nll = None
        if sft:
            # Token-mean NLL over this micro-batch's teacher tokens, scaled like TRL's entropy term (÷ GA).
            sft_nll = sft_nll_loss(per_token_logps, mask, is_off,
                                   tokens=None if batching is None else batching["off_policy_tokens"])
            loss = loss + self.args.sft_loss_coef * off_policy_weight * sft_nll / accumulation
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_loss_metrics(mode, mask, off_rows, per_token_logps, entropies, losses,
                               per_token_kl if self.beta != 0.0 else None, sft_nll is not None)
        if (mode == "train" and self.args.log_loss_term_grad_norms
                and self.state.global_step % self.args.loss_term_grad_norms_steps == 0):
            # The normalisers are linear in the per-token loss: the two terms add up to the policy term.
            on_term = aggregate_loss(per_token_loss * (~off_rows), pg_mask, self.loss_type, **normaliser)
            off_term = aggregate_loss(per_token_loss * off_rows, pg_mask, self.loss_type, **normaliser)
            if sft_nll is not None:
                off_term = off_term + self.args.sft_loss_coef * off_policy_weight * sft_nll / accumulation
            self._accumulate_term_grads(model, {"on_policy": on_term, "off_policy": off_term})
        return loss

    def _accumulate_term_grads(self, model, terms: dict) -> None:
        """`log_loss_term_grad_norms`: each term's gradient over the trainable parameters, summed over the micro-batches
        of the optimiser step; at its last micro-batch the norms are logged as `loss_terms/<term>_grad_norm`."""
        params = [p for p in model.parameters() if p.requires_grad]
        totals = getattr(self, "_term_grads", None) or {}
        for name, term in terms.items():
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]
            totals[name] = grads if name not in totals else [t + g for t, g in zip(totals[name], grads)]
        self._term_grads = totals
        if self.accelerator.sync_gradients:
            norms = {}
            for name, grads in totals.items():
                norms[name] = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).item()
                self._metrics["train"][f"loss_terms/{name}_grad_norm"].append(norms[name])
            # The angle between the two terms' gradients: < 0 when the sampled rows' term works against the teacher's.
            dot = sum((a.float() * b.float()).sum() for a, b in zip(totals["on_policy"], totals["off_policy"]))
            scale = norms["on_policy"] * norms["off_policy"]
            self._metrics["train"]["loss_terms/grad_cosine"].append(float(dot) / scale if scale > 0 else float("nan"))
            self._term_grads = None

    def _update_adaptive_entropy(self, entropies, effective_mask) -> None:
        """TRL 1.16's adaptive entropy controller (`use_adaptive_entropy`), from `GRPOTrainer._compute_loss`.

        The entropy sum and token count of every micro-batch of the accumulation window are accumulated; at the
        optimiser-step boundary they are reduced over processes, and `entropy_coef` moves by `entropy_coef_delta`
        towards more bonus when the window's token-mean entropy is at or below `entropy_target` (less above it),
        within [`entropy_coef_min`, `entropy_coef_max`]; the next window applies the bonus only when that entropy
        was at or below the target. Sums and counts: independent of how rows are assigned to micro-batches. The
        collective (a reduce) runs at every boundary, on every process (config, mode and step only).
        """
        stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
        window = self._entropy_window_stats
        self._entropy_window_stats = stats if window is None else window + stats
        if not self.accelerator.sync_gradients:
            return
        totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
        args = self.args
        if world_entropy <= args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
        self._last_world_entropy = world_entropy
        self._entropy_window_stats = None

    def _log_loss_metrics(self, mode, mask, off_rows, per_token_logps, entropies, losses, per_token_kl,
                          sft=False) -> None:
        """Token means over all processes, gathered in one all-reduce and one device-to-host copy.

        Stock TRL reduces and `.item()`s each metric on its own (a collective and a device sync per metric); with
        the teacher metrics added that would be eight of each per micro-batch.
        """
        metrics = self._metrics[mode]
        on_mask = mask * (~off_rows)
        off_mask = mask * off_rows
        low, high = losses.is_low_clipped.float(), losses.is_high_clipped.float()
        # Per-row clip indicators (sequence level) are averaged over on-policy rows, as TRL averages them over rows.
        clip_mask = (~off_rows).to(mask.dtype) if low.size(1) == 1 else on_mask
        terms = {}  # metric -> (per-token values, mask); teacher tokens are never clipped
        if per_token_kl is not None:
            terms["kl"] = (per_token_kl, mask)
        terms["entropy"] = (entropies, mask)
        ppo = self.loss_type in PPO_LOSS_TYPES
        if ppo:
            terms["clip_ratio/low_mean"] = (low, clip_mask)
            terms["clip_ratio/high_mean"] = (high, clip_mask)
            terms["clip_ratio/region_mean"] = (torch.maximum(low, high), clip_mask)
        elif self.loss_type == "cispo":
            terms["cispo_clip_ratio"] = (high, clip_mask)
        elif self.loss_type == "vespo":
            terms["vespo/phi_seq_mean"] = (losses.vespo_weight, (~off_rows).to(mask.dtype))
        if self.num_off_policy > 0 and mode == "train":
            terms["off_policy/prob_mean"] = (per_token_logps.detach().exp(), off_mask)
            if sft:
                terms["off_policy/sft_nll"] = (-per_token_logps, off_mask)
            else:
                terms["off_policy/shaping_weight_mean"] = (losses.shaping_weight, off_mask)
                if self.args.off_policy_max_clip is not None:
                    terms["off_policy/max_clip_fraction"] = (losses.off_max_clipped.float(), off_mask)
                if self.args.off_policy_min_clip is not None:
                    terms["off_policy/min_clip_fraction"] = (losses.off_min_clipped.float(), off_mask)
        if self.args.max_token_prob is not None:
            terms["dropped_token_fraction"] = ((~losses.kept).float(), mask)
        sums = torch.stack([(x.detach() * m).sum().float() for x, m in terms.values()]
                           + [m.sum().float() for _, m in terms.values()])
        sums = self.accelerator.reduce(sums, reduction="sum")
        n = len(terms)
        # NaN (left out of the logged average, as in TRL) where no process has such a token in this micro-batch: a 0
        # would pull the average down, and padding-free batches group the teacher rows into a few micro-batches.
        # Without teacher slots the trainer is GRPOTrainer, which logs 0 there (e.g. a micro-batch whose completions
        # are all masked by mask_truncated_completions).
        empty = 0.0 if self.num_off_policy == 0 else float("nan")
        means = torch.where(sums[n:] > 0, sums[:n] / sums[n:].clamp(min=1.0), empty).tolist()
        # Per-sequence clip fractions of on-policy rows (NaN for teacher rows, ignored by nanmin/nanmax).
        seq = torch.stack([(low * clip_mask).sum(1), (high * clip_mask).sum(1)]) / clip_mask.sum(1)
        # Reduced locally first: padding-free micro-batches hold different row counts on different processes.
        local = torch.stack([nanmin(seq[0]), nanmax(seq[1])]).view(1, 2)
        seq = self.accelerator.gather(local)  # gather concatenates along rows
        extremes = torch.stack([nanmin(seq[:, 0]), nanmax(seq[:, 1])]).tolist()
        for name, value in zip(terms, means):
            metrics[name].append(value)
        if ppo:
            metrics["clip_ratio/low_min"].append(extremes[0])
            metrics["clip_ratio/high_max"].append(extremes[1])
